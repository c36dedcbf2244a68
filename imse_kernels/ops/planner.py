"""Route planner (docs/design.md, section 2): factorized (F) or recomposed (R), chosen per call from the shapes.

F: h = x·Vhᵀ, y = (h ⊙ s)·Uᵀ.  h (N × r) is saved for the backward; since r ≤ d_in it is never
   larger than the x that `nn.Linear` saves.
R: y = x·W'ᵀ with W' = (U ⊙ s)·Vh (cached while s is unchanged); x is saved, as in `nn.Linear`.
The planner compares FLOPs of the whole step (forward and the backward that will follow).
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..backends import FACTORIZED, RECOMPOSED, resolve_backend
from ..overrides import Override


@dataclass(frozen=True)
class Plan:
    route: int
    flops_factorized: int
    flops_recomposed: int


def step_flops(n: int, d_in: int, d_out: int, r: int, need_ds: bool, need_dx: bool,
               has_weight: bool) -> tuple[int, int]:
    """FLOPs of a forward (+ the backward implied by need_ds/need_dx) on each route: (F, R)."""
    f = 2 * n * r * (d_in + d_out)
    if need_ds:
        f += 2 * n * r * d_out + (2 * n * r * d_in if need_dx else 0)
    elif need_dx:
        f += 2 * n * r * (d_in + d_out)
    rec = 0 if has_weight else 2 * r * d_in * d_out
    R = rec + 2 * n * d_in * d_out
    if need_ds:
        R += 2 * n * d_in * d_out + 2 * r * d_in * d_out
    if need_dx:
        R += 2 * n * d_in * d_out
    return f, R


def plan(n: int, d_in: int, d_out: int, r: int, need_ds: bool, need_dx: bool, has_weight: bool,
         device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Plan:
    """Choose the cheaper route; ties go to F (no d_out × d_in temporary).

    On a GPU the backend may decide from measurements (`measured_route`: the Triton backend times
    both routes once per shape when IMSE_TRITON_TUNE=1, and caches the result); otherwise, and under
    torch.compile, the FLOP model decides.
    """
    f, R = step_flops(n, d_in, d_out, r, need_ds, need_dx, has_weight)
    forced = _forced.get()
    if forced is not None:
        return Plan(forced, f, R)
    if device is not None and device.type != "cpu" and not torch.compiler.is_compiling():
        route = resolve_backend(device).measured_route(n, d_in, d_out, r, need_ds, need_dx, has_weight, dtype, device)
        if route is not None:
            return Plan(route, f, R)
    return Plan(FACTORIZED if f <= R else RECOMPOSED, f, R)


_forced = Override("route")
_ROUTES = {"factorized": FACTORIZED, "recomposed": RECOMPOSED}


@contextlib.contextmanager
def force_route(name: str) -> Iterator[None]:
    """Pin the route ('factorized' or 'recomposed') inside the block, for tests and benchmarks."""
    if name not in _ROUTES:
        raise ValueError(f"force_route: unknown route {name!r}; choose 'factorized' or 'recomposed'")
    with _forced.set(_ROUTES[name]):
        yield
