"""Halting policies, one file each, registered by name in ``zoo.registry.HALTING``."""

from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.halting.none import NoHalting
from zoo.halting.mlp_gate import MLPGate
from zoo.halting.fixed_prune import FixedPrune
from zoo.halting.act import ACT
from zoo.halting.early_exit import EarlyExit

__all__ = ["HaltingPolicy", "HaltStep", "PassContext", "NoHalting", "MLPGate", "FixedPrune", "ACT", "EarlyExit"]
