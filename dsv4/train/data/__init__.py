"""The training data pipeline: documents (the stdlib's sources or your files) -> a held-out split -> token
streams (cached on disk) -> resumable random training batches and fixed evaluation batches. `prepare_data` runs
the first steps for a TrainConfig."""
from .corpus import Document, MissingExtra, read_documents, split_documents, stdlib_sources
from .loader import TokenLoader, eval_batches
from .prepare import PreparedData, prepare_data
from .tokens import cached_tokens, tokenize_documents

__all__ = ["Document", "MissingExtra", "stdlib_sources", "read_documents", "split_documents", "tokenize_documents",
           "cached_tokens", "TokenLoader", "eval_batches", "PreparedData", "prepare_data"]
