"""Cache strategies, registered by name in ``zoo.registry.CACHES``, and their storage."""

from zoo.caches.base import CacheStrategy, KVStore, KVView, PassWork
from zoo.caches.buffers import BufferView, LayerBuffers, PassBuffers
from zoo.caches.kv_reuse import KVReuse
from zoo.caches.kv_share import KVShare
from zoo.caches.recompute import Recompute
from zoo.caches.recursion_wise import RecursionWise

__all__ = [
    "CacheStrategy",
    "KVStore",
    "KVView",
    "PassWork",
    "BufferView",
    "LayerBuffers",
    "PassBuffers",
    "KVReuse",
    "KVShare",
    "Recompute",
    "RecursionWise",
]
