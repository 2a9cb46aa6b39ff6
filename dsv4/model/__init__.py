"""The V4 model, one module per architectural piece."""
from .transformer import Block, MTPBlock, Transformer

__all__ = ["Transformer", "Block", "MTPBlock"]
