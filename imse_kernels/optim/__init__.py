"""Optimizers: SAM around a base optimizer, and Adam over the rows of per-stream code tables."""
from .row_adam import RowAdam
from .sam import SAM

__all__ = ["SAM", "RowAdam"]
