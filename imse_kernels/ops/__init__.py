"""Custom ops: `spectral_linear` (autograd over the backends) and the route planner."""
from .planner import FACTORIZED, RECOMPOSED, force_route, plan
from .spectral_linear import spectral_linear
from .weight_cache import RecomposedWeightCache

__all__ = ["spectral_linear", "plan", "force_route", "FACTORIZED", "RECOMPOSED", "RecomposedWeightCache"]
