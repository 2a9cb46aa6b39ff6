"""The training data pipeline: documents (the stdlib's sources or your files) -> a held-out split -> token
streams (cached on disk) -> resumable random training batches and fixed evaluation batches."""
from .corpus import Document, read_documents, split_documents, stdlib_sources
from .loader import TokenLoader, eval_batches
from .tokens import cached_tokens, tokenize_documents

__all__ = ["Document", "stdlib_sources", "read_documents", "split_documents", "tokenize_documents",
           "cached_tokens", "TokenLoader", "eval_batches"]
