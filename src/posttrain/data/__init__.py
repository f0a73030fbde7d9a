"""Datasets: loading from files / directories / the local hub cache, format detection and validation,
and encoding rows into token ids with loss masks."""
from posttrain.data.encode import (
    Encoded,
    EncodeError,
    completion_text,
    encode_conversation,
    encode_dataset,
    encode_prompt,
    encode_sft,
    show_mask,
)
from posttrain.data.formats import FORMATS, detect_format, is_conversational, validate
from posttrain.data.loading import DataError, RowSet, load_rows

__all__ = [
    "DataError", "RowSet", "load_rows",
    "FORMATS", "detect_format", "validate", "is_conversational",
    "Encoded", "EncodeError", "encode_sft", "encode_prompt", "encode_dataset", "encode_conversation",
    "completion_text", "show_mask",
]
