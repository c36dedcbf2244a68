"""`spectral_linear`: y = ((x·Vhᵀ) ⊙ s)·Uᵀ + bias, with gradients for x and s only.

Two `torch.library` custom ops (forward and backward) carry one autograd formula; the route
(planner.py) is chosen in Python before the op, so fake implementations know every shape and
`torch.compile(fullgraph=True)` sees no graph break. The backend is resolved inside the ops.
Eager calls run the same implementations and formula through an autograd.Function instead.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends import resolve_backend
from ..precision import warn_slow_autocast
from .planner import FACTORIZED, RECOMPOSED, plan
from .weight_cache import RecomposedWeightCache

_EMPTY = (0,)


def _empty_like(x: Tensor) -> Tensor:
    return x.new_empty(_EMPTY)


def _no_autocast(device_type: str):
    """Autocast off inside the kernels; a no-op context when it is already off (the common case)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Forward op

def _forward_impl(
    x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, bias: Optional[Tensor], index: Optional[Tensor],
    route: int, need_ds: bool, need_dx: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (y, aux): aux is h (route F, when ds is needed), the recomposed W (route R, when a
    backward follows) or an empty tensor. With `index` (per-sample codes, s is (K, r)) the route is F."""
    backend = resolve_backend(x.device)
    with _no_autocast(x.device.type):
        if index is not None:
            y, h = backend.indexed_forward(x, U, s, Vh, bias, index, need_ds)
            return y, (h if need_ds else _empty_like(x))
        if route == FACTORIZED:
            y, h = backend.factorized_forward(x, U, s, Vh, bias, need_ds)
            return y, (h if need_ds else _empty_like(x))
        W = backend.recompose(U, s, Vh)
        y = backend.dense_forward(x, W, bias)
        return y, (W if (need_ds or need_dx) else _empty_like(x))


_forward_op = torch.library.custom_op("imse::spectral_linear_fwd", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _(x, U, s, Vh, bias, index, route, need_ds, need_dx):
    y = x.new_empty((x.shape[0], U.shape[0]))
    if (route == FACTORIZED or index is not None) and need_ds:
        return y, x.new_empty((x.shape[0], U.shape[1]))
    if route == RECOMPOSED and (need_ds or need_dx):
        return y, x.new_empty((U.shape[0], Vh.shape[1]))
    return y, x.new_empty(_EMPTY)


# --------------------------------------------------------------------------------------------
# Backward op

def _backward_impl(
    grad: Tensor, saved: Optional[Tensor], U: Tensor, s: Tensor, Vh: Tensor, weight: Optional[Tensor],
    index: Optional[Tensor], route: int, need_ds: bool, need_dx: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (dx, ds); either is an empty tensor when not needed. `saved` is h (route F) or x
    (route R) when ds is needed; `weight` is W for route R; ds has s's shape ((K, r) with `index`)."""
    backend = resolve_backend(grad.device)
    grad = grad.contiguous()
    dx = ds = None
    with _no_autocast(grad.device.type):
        if index is not None:
            if need_ds:
                dx, ds = backend.indexed_backward(grad, saved, U, s, Vh, index, need_dx)
            elif need_dx:
                dx = backend.indexed_input_grad(grad, U, s, Vh, index)
        elif route == FACTORIZED:
            if need_ds:
                dx, ds = backend.factorized_backward(grad, saved, U, s, Vh, need_dx)
            elif need_dx:
                dx = backend.factorized_input_grad(grad, U, s, Vh)
        else:
            if need_ds:
                dx, ds = backend.recomposed_backward(grad, saved, U, s, Vh, weight, need_dx)
            elif need_dx:
                dx = backend.dense_input_grad(grad, weight)
    return (dx if dx is not None else _empty_like(grad)), (ds if ds is not None else s.new_empty(_EMPTY))


_backward_op = torch.library.custom_op("imse::spectral_linear_bwd", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _(grad, saved, U, s, Vh, weight, index, route, need_ds, need_dx):
    dx = grad.new_empty((grad.shape[0], Vh.shape[1]) if need_dx else _EMPTY)
    ds = s.new_empty(tuple(s.shape) if need_ds else _EMPTY)
    return dx, ds


# --------------------------------------------------------------------------------------------
# Autograd: one formula for every backend, reached two ways. Under torch.compile the custom ops
# above carry it (fake impls, no graph break); in eager mode an autograd.Function runs the same
# implementations without the custom-op dispatch, which costs about 0.1 ms a call.

def _save(ctx, x, aux, U, s, Vh, bias, index, route, need_ds, need_dx) -> None:
    ctx.route, ctx.need_ds, ctx.need_dx = route, need_ds, need_dx
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]
    if route == FACTORIZED or index is not None:
        saved, W = (aux if need_ds else None), None
    else:
        saved, W = (x if need_ds else None), aux
    ctx.save_for_backward(saved, U, s, Vh, W, index)


def _grads(ctx, grad_y, backward_fn) -> tuple:
    """(dx, ds, dbias) for the inputs that need them; backward_fn is the op or its implementation."""
    dx = ds = db = None
    if grad_y is None:
        return dx, ds, db
    saved, U, s, Vh, W, index = ctx.saved_tensors
    need_ds = ctx.need_ds and ctx.needs_input_grad[2]
    need_dx = ctx.need_dx and ctx.needs_input_grad[0]
    if need_ds or need_dx:
        dx, ds = backward_fn(grad_y, saved, U, s, Vh, W, index, ctx.route, need_ds, need_dx)
        dx = dx if need_dx else None
        ds = ds if need_ds else None
    if ctx.bias_grad:
        db = grad_y.sum(0)
    return dx, ds, db


def _setup_context(ctx, inputs, output):
    x, U, s, Vh, bias, index, route, need_ds, need_dx = inputs
    _, aux = output
    ctx.mark_non_differentiable(aux)
    ctx.set_materialize_grads(False)  # aux gets no gradient; do not allocate zeros for it
    _save(ctx, x, aux, U, s, Vh, bias, index, route, need_ds, need_dx)


def _backward(ctx, grad_y, _grad_aux):
    dx, ds, db = _grads(ctx, grad_y, _backward_op)
    return dx, None, ds, None, db, None, None, None, None


torch.library.register_autograd("imse::spectral_linear_fwd", _backward, setup_context=_setup_context)


class _EagerSpectralLinear(torch.autograd.Function):
    """The eager path: `_forward_impl`/`_backward_impl` with the formula above."""

    @staticmethod
    def forward(ctx, x, U, s, Vh, bias, index, route, need_ds, need_dx):
        y, aux = _forward_impl(x, U, s, Vh, bias, index, route, need_ds, need_dx)
        _save(ctx, x, aux, U, s, Vh, bias, index, route, need_ds, need_dx)
        return y

    @staticmethod
    @once_differentiable  # no double backward: differentiating the gradients raises, as the custom op does
    def backward(ctx, grad_y):
        dx, ds, db = _grads(ctx, grad_y, _backward_impl)
        return dx, None, ds, None, db, None, None, None, None


# --------------------------------------------------------------------------------------------
# The public function

def _check_index(index: Tensor, x: Tensor, s: Tensor, check_range: bool) -> None:
    if not isinstance(index, Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"spectral_linear: index must be an int64 tensor, got {got}")
    if s.dim() != 2:
        raise ValueError(f"spectral_linear: with index, s must be a code table (K, r), got shape {tuple(s.shape)}")
    if index.device != x.device:
        raise ValueError(f"spectral_linear: index is on {index.device} but x is on {x.device}")
    lead = tuple(x.shape[:-1])
    if x.dim() < 2 or tuple(index.shape) not in ((x.shape[0],), lead):
        raise ValueError(f"spectral_linear: index must have shape (x.shape[0],) (one code per sample) or "
                         f"x.shape[:-1] (one per row); x is {tuple(x.shape)}, index is {tuple(index.shape)}")
    # A host sync, so skipped under torch.compile: there a code outside [0, K) gives a NaN row (Triton,
    # CUDA, the ATen default) or raises (the CPU extension), never a read outside s (docs/design.md §5).
    if check_range and index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= s.shape[0]:
            raise IndexError(f"spectral_linear: index values must be in [0, K={s.shape[0]}), got min {lo}, max {hi}")


def _rows_index(index: Tensor, x: Tensor) -> Tensor:
    """The code of each of x's N rows: a per-sample index (B,) repeats over the other leading dims."""
    if index.dim() == 1 and x.dim() > 2:
        return index.repeat_interleave(math.prod(x.shape[1:-1]))
    return index.reshape(-1)


def _check_inputs(x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, bias: Optional[Tensor],
                  coded: bool = False) -> None:
    named = {"x": x, "U": U, "s": s, "Vh": Vh}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"spectral_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"spectral_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if U.dim() != 2 or Vh.dim() != 2 or s.dim() != (2 if coded else 1):
        want = "s (K, r) with index" if coded else "s (r,) (a (K, r) code table needs index=)"
        raise ValueError(
            f"spectral_linear: expected U (d_out, r), {want}, Vh (r, d_in); got U {tuple(U.shape)}, "
            f"s {tuple(s.shape)}, Vh {tuple(Vh.shape)}"
        )
    r = s.shape[-1]
    if U.shape[1] != r or Vh.shape[0] != r:
        raise ValueError(
            f"spectral_linear: rank mismatch: U {tuple(U.shape)} has r={U.shape[1]}, s has r={r}, "
            f"Vh {tuple(Vh.shape)} has r={Vh.shape[0]}"
        )
    if x.dim() == 0 or x.shape[-1] != Vh.shape[1]:
        raise ValueError(
            f"spectral_linear: x has shape {tuple(x.shape)} but Vh {tuple(Vh.shape)} "
            f"expects last dim d_in={Vh.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (U.shape[0],):
        raise ValueError(f"spectral_linear: bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"spectral_linear: all tensors must be on one device, got {devices}")
    if U.requires_grad or Vh.requires_grad:
        raise ValueError(
            "spectral_linear: U and Vh are frozen (only s and x get gradients); "
            "call .detach() or set requires_grad_(False) on them"
        )


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The compute dtype when autocast is on for x's device, else None. On a CPU without native support
    for it (no AVX512-BF16/AMX for bf16) this warns once per process (docs/design.md §14)."""
    if not torch.is_autocast_enabled(x.device.type):
        return None
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        warn_slow_autocast(x.device, dtype)
    return dtype


def _frozen_fast_path(x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, bias: Optional[Tensor],
                      cache: RecomposedWeightCache) -> Optional[Tensor]:
    """The frozen-s fast path (the only one): with s not trained by this call and the planner choosing
    route R, y = x·W'ᵀ + b with the cached W' is exactly a frozen nn.Linear (autograd gives dx = g·W'),
    without the op's dispatch. None when it does not apply; the general path then checks and runs.
    The factors are validated once per cached W' (the cache key covers them); x and bias every call.
    Under autocast W' and the bias are cached in the autocast dtype (docs/design.md §14) and x is cast."""
    if ((torch.is_grad_enabled() and s.requires_grad) or not isinstance(x, Tensor)
            or x.dim() == 0 or x.shape[-1] != Vh.shape[1] or x.device != U.device
            or (bias is not None and (bias.shape != (U.shape[0],) or bias.device != U.device))
            or torch.compiler.is_compiling()):
        return None
    dtype = _autocast_dtype(x)
    if dtype is None:
        if x.dtype != U.dtype or (bias is not None and bias.dtype != U.dtype):
            return None
        dtype = U.dtype
    elif not x.is_floating_point() or (bias is not None and not bias.is_floating_point()):
        return None
    d_out, r = U.shape
    need_dx = torch.is_grad_enabled() and x.requires_grad
    if plan(x.numel() // x.shape[-1], Vh.shape[1], d_out, r, False, need_dx, has_weight=True,
            device=x.device, dtype=dtype).route != RECOMPOSED:
        return None
    W = cache.lookup(U, s, Vh, dtype)
    if W is None:
        _check_inputs(x, U, s, Vh, bias)
        W = cache.get(U, s, Vh, dtype)
    if x.dtype != dtype:
        x = x.to(dtype)
    return torch.nn.functional.linear(x, W, cache.cast("bias", bias, dtype))


def spectral_linear(
    x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, bias: Optional[Tensor] = None,
    *, index: Optional[Tensor] = None, weight_cache: Optional[RecomposedWeightCache] = None,
) -> Tensor:
    """((x·Vhᵀ) ⊙ s)·Uᵀ + bias for x of any leading shape (…, d_in) → (…, d_out).

    Gradients flow to x and s (and to bias if it requires grad); U and Vh must be frozen.
    `index` gives every sample its own code (docs/design.md §8): s is then a (K, r) table, `index`
    is int64 of shape (x.shape[0],) (one code per sample) or x.shape[:-1] (one per row), and ds is
    (K, r). `weight_cache` (kept by `FusedSpectralLinear`) lets the recomposed route reuse
    W' = (U ⊙ s)·Vh while s is unchanged, so inference with frozen s is a single GEMM.
    """
    return _spectral_linear(x, U, s, Vh, bias, index, weight_cache, check_index_range=True)


def _spectral_linear(x, U, s, Vh, bias, index, weight_cache, check_index_range: bool) -> Tensor:
    """`spectral_linear`; the layers pass check_index_range=False for an index `stream_codes` checked."""
    if index is not None:
        _check_index(index, x, s, check_index_range)
    elif weight_cache is not None:
        y = _frozen_fast_path(x, U, s, Vh, bias, weight_cache)
        if y is not None:
            return y
    _check_inputs(x, U, s, Vh, bias, coded=index is not None)
    autocast_dtype = _autocast_dtype(x)  # autocast: x, U, Vh and bias are cast to it below; s stays as it is
    dtype = autocast_dtype or U.dtype
    if autocast_dtype is None and (x.dtype != U.dtype or Vh.dtype != U.dtype
                                   or (bias is not None and bias.dtype != U.dtype)):
        raise TypeError(
            f"spectral_linear: x, U, Vh and bias must share a dtype (outside autocast); got x {x.dtype}, "
            f"U {U.dtype}, Vh {Vh.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if x.dtype != dtype:
        x = x.to(dtype)
    if weight_cache is not None and not torch.compiler.is_compiling():
        U, Vh, bias = weight_cache.factors(U, Vh, bias, dtype)  # autocast: cast once per version (§14)
    else:  # autocast without a layer's cache, or inside torch.compile (the cast is then part of the graph)
        if U.dtype != dtype:
            U, Vh = U.to(dtype), Vh.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)

    lead = x.shape[:-1]
    n, d_in = math.prod(lead), x.shape[-1]
    d_out, r = U.shape
    grad_on = torch.is_grad_enabled()
    need_ds = grad_on and s.requires_grad
    need_dx = grad_on and x.requires_grad
    if index is not None:
        route, index = FACTORIZED, _rows_index(index, x).contiguous()
    else:
        route = plan(n, d_in, d_out, r, need_ds, need_dx, has_weight=False, device=x.device, dtype=dtype).route
    bias = bias.contiguous() if bias is not None else None  # kernels read bias at unit stride
    args = (x.reshape(n, d_in).contiguous(), U.contiguous(), s.contiguous(), Vh.contiguous(), bias, index,
            route, need_ds, need_dx)
    if torch.compiler.is_compiling():
        y, _ = _forward_op(*args)
    else:
        y = _EagerSpectralLinear.apply(*args)
    return y.reshape(*lead, d_out)
