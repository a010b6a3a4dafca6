"""Download-free training data: corpora, tokenizers and step-addressed token datasets."""

from integration.data.corpus import (
    DEFAULT_MAX_BYTES,
    corpus_fingerprint,
    read_documents,
    read_text_files,
    resolve_paths,
    stdlib_files,
)
from integration.data.dataset import DEFAULTS, TokenDataset, build_dataset, load_megatron_tokens
from integration.data.tokenizer import EOS_TOKEN, BPETokenizer, ByteTokenizer, get_tokenizer

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULTS",
    "EOS_TOKEN",
    "BPETokenizer",
    "ByteTokenizer",
    "TokenDataset",
    "build_dataset",
    "corpus_fingerprint",
    "get_tokenizer",
    "load_megatron_tokens",
    "read_documents",
    "read_text_files",
    "resolve_paths",
    "stdlib_files",
]
