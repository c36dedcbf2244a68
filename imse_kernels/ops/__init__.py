"""Custom ops: `spectral_linear` (autograd over the backends) and the route planner."""
from .planner import FACTORIZED, RECOMPOSED, plan
from .spectral_linear import spectral_linear
from .weight_cache import RecomposedWeightCache

__all__ = ["spectral_linear", "plan", "FACTORIZED", "RECOMPOSED", "RecomposedWeightCache"]
