"""Token ids and loss masks: golden checks of what is supervised, by decoding the masked tokens."""
import copy

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from posttrain.data import (
    DataError,
    Encoded,
    EncodeError,
    RowSet,
    completion_text,
    encode_dataset,
    encode_prompt,
    encode_sft,
    show_mask,
)
from posttrain.models import load_tokenizer

# Qwen2.5-style ChatML without `{% generation %}` tags, with a default system prompt.
CHATML_NO_TAGS = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Plain-text roles; the assistant turn ends with eos itself (as Mistral/Llama-2 templates do).
EOS_TERMINATED = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'Answer:\\n' + m['content'] + '<|endoftext|>' + '\\n' }}"
    "{% else %}{{ 'Question: ' + m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is 12 + 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "and 1 + 1?"},
    {"role": "assistant", "content": "The answer is 2"},
]


@pytest.fixture
def tok(tokenizer):
    """The session tokenizer (no pad) after load_tokenizer: pad falls back to eos. Copied: the fixture stays pad-less."""
    return load_tokenizer(copy.deepcopy(tokenizer))


def with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised_spans(enc: Encoded, tok) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    spans, cur = [], []
    for t, m in zip(enc.input_ids + [None], enc.loss_mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans


# ---------------------------------------------------------------- text

def test_text_supervises_every_token_including_eos(tok):
    enc = encode_sft({"text": "The quick brown fox"}, "text", tok)
    assert enc.input_ids == ids(tok, "The quick brown fox") + [tok.eos_token_id]
    assert enc.loss_mask == [1] * len(enc.input_ids)


def test_pad_equal_to_eos_still_supervises_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # the fallback this test is about
    for row, fmt in [({"text": "hi"}, "text"), ({"prompt": "Question: 1+1?", "completion": " 2"}, "prompt_completion")]:
        enc = encode_sft(row, fmt, tok)
        assert enc.input_ids[-1] == tok.pad_token_id and enc.loss_mask[-1] == 1


def test_text_gets_exactly_one_bos_when_the_tokenizer_adds_one(tokenizer):
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    for text in ("hello", "<s>hello"):
        enc = encode_sft({"text": text}, "text", t)
        assert enc.input_ids == [bos] + ids(t, "hello") + [t.eos_token_id]


def test_text_rows_tokenized_in_one_call_equal_the_row_by_row_encoding(tokenizer):
    """encode_dataset tokenizes a `text` dataset in one batch call: the same ids and masks as encode_sft row by
    row, with the tokenizer's BOS, and rows too long (in characters or in tokens) refused with their row number."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    rows = [{"text": "hello"}, {"text": "x" * 5000}, {"text": "<s>two words"}, {"text": "1 2 3 4 5 6 7 8"},
            {"text": "the end"}]
    encoded, bad = encode_dataset(RowSet(rows, "corpus.jsonl"), "text", t, max_len=12)
    kept = [r for r in rows if len(encode_sft(r, "text", t).input_ids) <= 12]
    assert len(kept) == 3 and [(b.row, b.field) for b in bad] == [(2, None), (4, None)]
    assert [(e.input_ids, e.loss_mask) for e in encoded] == [
        (e.input_ids, e.loss_mask) for e in (encode_sft(r, "text", t) for r in kept)]
    assert all(e.input_ids[0] == bos and e.input_ids[1] != bos for e in encoded)


# ---------------------------------------------------------------- conversations

def test_messages_mask_is_assistant_content_and_end_of_turn_with_generation_tags(tok):
    enc = encode_sft({"messages": CONVERSATION}, "messages", tok)
    assert supervised_spans(enc, tok) == ["19<|im_end|>", "The answer is 2<|im_end|>"]
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # The template's own {% generation %} mask is the reference our prefix-diff method must reproduce.
    ref = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert enc.input_ids == list(ref["input_ids"]) and enc.loss_mask == list(ref["assistant_masks"])


def test_messages_mask_for_a_template_without_generation_tags(tok):
    t = with_template(tok, CHATML_NO_TAGS)
    conv = CONVERSATION[1:]  # no system message: the template inserts its default one
    enc = encode_sft({"messages": conv}, "messages", t)
    assert t.decode(enc.input_ids).startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert supervised_spans(enc, t) == ["19<|im_end|>", "The answer is 2<|im_end|>"]
    assert t.decode(enc.input_ids[-1:]) == "\n"  # the layout newline exists ...
    assert enc.loss_mask[-1] == 0  # ... and the newline after <|im_end|> is not supervised


def test_messages_mask_when_eos_ends_the_assistant_turn(tok):
    t = with_template(tok, EOS_TERMINATED)
    enc = encode_sft({"messages": CONVERSATION[1:]}, "messages", t)
    assert supervised_spans(enc, t) == ["19<|endoftext|>", "The answer is 2<|endoftext|>"]
    assert show_mask(enc, t) == ("Question: what is 12 + 7?\nAnswer:\n[[19<|endoftext|>]]\n"
                                 "Question: and 1 + 1?\nAnswer:\n[[The answer is 2<|endoftext|>]]\n")


def test_template_that_rewrites_earlier_turns_is_an_error(tok):
    hides_history = (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\\n(omitted)<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(EncodeError, match="not prefix-stable"):
        encode_sft({"messages": CONVERSATION}, "messages", with_template(tok, hides_history))


@pytest.mark.parametrize("header,content", [
    ("\\nA", "nswer"),  # "A" + "nswer" tokenize together as "Answer"
    ("\\nAnswer: ", "The end"),  # a header ending in a space: " The" is one token
])
def test_token_merge_across_turn_boundary_is_an_error(tok, header, content):
    glued = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + '<|im_end|>' }}"
             "{% else %}{{ m['content'] + '" + header + "' }}{% endif %}{% endfor %}")
    conv = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": content}]
    with pytest.raises(EncodeError, match="merge across the boundary after message 1"):
        encode_sft({"messages": conv}, "messages", with_template(tok, glued))


def test_turn_without_end_token_is_an_error(tok):
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(EncodeError, match="never learn to stop"):
        encode_sft({"messages": CONVERSATION}, "messages", with_template(tok, no_end))


# ---------------------------------------------------------------- prompt / completion

def test_string_prompt_and_completion_are_tokenized_separately(tok):
    enc = encode_sft({"prompt": "The quick bro", "completion": "wn fox"}, "prompt_completion", tok)
    p, c = ids(tok, "The quick bro"), ids(tok, "wn fox")
    assert enc.input_ids == p + c + [tok.eos_token_id]
    assert enc.input_ids != ids(tok, "The quick brown fox") + [tok.eos_token_id]  # a joint tokenization merges
    assert enc.loss_mask == [0] * len(p) + [1] * (len(c) + 1)


def test_conversational_prompt_completion_masks_only_the_completion(tok):
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]  # prompt holds an earlier assistant turn
    enc = encode_sft({"prompt": prompt, "completion": completion}, "prompt_completion", tok)
    assert supervised_spans(enc, tok) == ["The answer is 2<|im_end|>"]
    p = encode_prompt(prompt, tok)
    assert enc.input_ids[: len(p)] == p and not any(enc.loss_mask[: len(p)])  # RL prompt ids == SFT prompt ids


def test_prompt_answer_trains_on_the_demonstration_column(tok):
    enc = encode_sft({"prompt": "1+1=", "answer": "2", "solution": " 2"}, "prompt_answer", tok)
    assert supervised_spans(enc, tok) == [" 2<|endoftext|>"]
    with pytest.raises(EncodeError, match="no demonstration"):
        encode_sft({"prompt": "1+1=", "answer": "2"}, "prompt_answer", tok)
    with pytest.raises(ValueError, match="no supervised target"):
        encode_sft({"prompt": "p"}, "prompt_only", tok)


def test_encode_prompt_string_as_is_and_messages_with_generation_prompt(tok):
    assert encode_prompt("What is 1 + 1?", tok) == ids(tok, "What is 1 + 1?")
    p = encode_prompt(CONVERSATION[:2], tok)
    assert tok.decode(p) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is 12 + 7?<|im_end|>\n" \
                            "<|im_start|>assistant\n"


def test_completion_text_follows_the_prompt_form(tok):
    sampled = ids(tok, "The answer is 19") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert completion_text("q", sampled, tok) == "The answer is 19"
    assert completion_text(CONVERSATION[:2], sampled, tok) == [{"role": "assistant", "content": "The answer is 19"}]


# ---------------------------------------------------------------- datasets

def test_overlong_rows_are_bad_rows_named_with_their_length(tok):
    rows = [{"text": "hi"}, {"text": "The quick brown fox jumps over the lazy dog."}, {"text": "ok"}]
    lengths = [len(encode_sft(r, "text", tok)) for r in rows]
    max_len = lengths[1] - 1
    assert max(lengths[0], lengths[2]) <= max_len
    encoded, bad = encode_dataset(RowSet(rows, "d.jsonl"), "text", tok, max_len=max_len)
    assert [str(b) for b in bad] == [f"row 2: is {lengths[1]} tokens long, more than data.max_len={max_len}"]
    assert [len(e) for e in encoded] == [lengths[0], lengths[2]]
    assert encoded[1] == encode_sft(rows[2], "text", tok)  # kept rows unchanged, in order
    _, none = encode_dataset(RowSet(rows, "d.jsonl"), "text", tok, max_len=lengths[1])
    assert none == []  # max_len is inclusive


def test_a_10_mb_row_is_refused_from_its_length_without_tokenizing(tok, monkeypatch):
    """A string of c characters is at least c / (longest token) tokens: a 10 MB row is judged without being
    tokenized (the tokenizer is replaced by one that fails if called on it), at the cost of reading it."""
    from posttrain.data import encode as enc_mod

    huge = {"text": "ab " * 3_500_000}
    real = enc_mod.encode_sft
    monkeypatch.setattr(enc_mod, "encode_sft", lambda row, *a, **k: (
        pytest.fail("tokenized the 10 MB row") if row is huge else real(row, *a, **k)))
    encoded, bad = encode_dataset(RowSet([{"text": "hi"}, huge], "d.jsonl"), "text", tok, max_len=512)
    assert len(encoded) == 1 and len(bad) == 1
    assert bad[0].row == 2 and "10500000 characters long, so more than max_len=512 tokens" in bad[0].reason
    assert len(bad[0].excerpt) <= 203


def test_rows_that_cannot_be_encoded_are_bad_rows_with_row_and_field(tok):
    rows = [{"prompt": "p", "answer": "1", "completion": "c"}, {"prompt": "p", "answer": "1"}]
    encoded, bad = encode_dataset(RowSet(rows, "x.jsonl"), "prompt_answer", tok, max_len=64)
    assert len(encoded) == 1 and (bad[0].origin, bad[0].row, bad[0].field) == ("x.jsonl", 2, "completion")
    assert "no demonstration" in bad[0].reason
