"""Halting policies, one file each, registered by name in ``zoo.registry.HALTING``."""

from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.halting.none import NoHalting

__all__ = ["HaltingPolicy", "HaltStep", "PassContext", "NoHalting"]
