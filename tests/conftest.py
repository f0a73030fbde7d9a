"""Shared fixtures: a locally trained tokenizer and tiny random models (nothing is downloaded)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from posttrain.tiny import ARCHITECTURES, tiny_model, train_tokenizer  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with reward workers
# (or another job) OpenMP spin-waiting makes oversubscribed runs many times slower.
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 + 7? Answer: 19",
    "user assistant system: think step by step, then answer.",
    "Answer with the letter A. A B C D",
    "0 1 2 3 4 5 6 7 8 9 + - * = ( ) #### The answer is",
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE with a ChatML template and no pad token (exercises the pad -> eos fallback)."""
    return train_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def tokenizer_with_pad():
    return train_tokenizer(CORPUS, vocab_size=320, with_pad=True)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def make_model(tokenizer):
    def make(arch: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
        return tiny_model(arch, tokenizer, seed=seed, **kw).to(dtype)
    return make
