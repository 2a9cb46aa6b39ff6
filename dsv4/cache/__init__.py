"""Inference cache: window rings, compressed entries, indexer keys and compressor state per layer."""
from .kv_cache import CacheCheckpoint, CacheDamaged, KVCache, LayerCache
from .layout import RowStore, record_bytes
from .state import Compressed, CompressorState

__all__ = ["KVCache", "CacheCheckpoint", "CacheDamaged", "LayerCache", "RowStore", "record_bytes", "CompressorState",
           "Compressed"]
