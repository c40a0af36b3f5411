"""Cache strategies, registered by name in ``zoo.registry.CACHES``."""

from zoo.caches.base import CacheStrategy
from zoo.caches.kv_reuse import CarriedKV, KVReuse
from zoo.caches.recompute import Recompute

__all__ = ["CacheStrategy", "CarriedKV", "KVReuse", "Recompute"]
