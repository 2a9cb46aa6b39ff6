"""Verifiable environments: fresh problems, a held-out set, a solver that writes SFT demonstrations, a reward."""
from .base import Environment, Problem, Reward

__all__ = ["Environment", "Problem", "Reward"]
