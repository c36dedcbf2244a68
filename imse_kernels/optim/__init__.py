"""Optimizers: SAM around a base optimizer."""
from .sam import SAM

__all__ = ["SAM"]
