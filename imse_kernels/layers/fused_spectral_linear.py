"""`FusedSpectralLinear`: a drop-in `nn.Linear` whose weight is U·diag(s)·Vh with only s trained."""
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.spectral_linear import _spectral_linear, spectral_linear
from ..ops.weight_cache import RecomposedWeightCache
from ..overrides import Override
from .conv1d import rebuild_linear

#: (ids of the coded layers in scope, index) inside `stream_codes`; None outside.
active_codes = Override("stream_codes")


def _svd(weight: Tensor, svd_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD, in float64 on CPU and float32 elsewhere unless `svd_dtype` is given."""
    svd_dtype = svd_dtype or (torch.float64 if weight.device.type == "cpu" else torch.float32)
    with torch.no_grad():
        return torch.linalg.svd(weight.detach().to(svd_dtype), full_matrices=False)


class FusedSpectralLinear(nn.Module):
    """y = ((x·Vhᵀ) ⊙ s)·Uᵀ + bias.

    Buffers `U` (d_out × r) and `Vh` (r × d_in) in the layer dtype; `s` (r,) is a float32 Parameter
    (its optimizer state stays float32 under autocast); `bias` is a frozen buffer unless
    `trainable_bias=True`. Build one from a pretrained layer with `from_linear`. Like `nn.Linear`
    it has `in_features`, `out_features`, `bias` and `weight` (read-only: U·diag(s)·Vh, cached
    while s is unchanged).

    `enable_codes(K)` adds a (K, r) table `codes` (float32 Parameter, every row a copy of s); inside
    `imse_kernels.stream_codes(model, index)` sample b then uses `codes[index[b]]` (docs/design.md §8).

    `factor_tap`, when set, sees every forward under autograd as tap(x_rows, h): h = x·Vhᵀ
    (differentiable in x) where this forward computes it anyway (or, under autocast, from the cached
    low-precision Vh), else None. IMSE's diversity probe uses it to take its statistics from h
    instead of a second GEMM.

    Under `torch.autocast` (e.g. `with torch.autocast("cpu", torch.bfloat16): adapter(x)` on a CPU with
    native bf16, docs/design.md §14) the layer keeps U, Vh, the bias and a frozen layer's W' cast to the
    autocast dtype, per version of U, s, Vh, so nothing is cast on every call; s, its gradient and the
    optimizer state stay float32.
    """

    def __init__(self, in_features: int, out_features: int, rank: Optional[int] = None, bias: bool = True,
                 trainable_bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        full = min(in_features, out_features)
        rank = full if rank is None else int(rank)
        if not 1 <= rank <= full:
            raise ValueError(f"FusedSpectralLinear: rank must be in [1, {full}], got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("U", torch.empty(out_features, rank, **factory))
        self.register_buffer("Vh", torch.empty(rank, in_features, **factory))
        self.s = nn.Parameter(torch.empty(rank, device=device, dtype=torch.float32))
        if bias and trainable_bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        elif bias:
            self.register_buffer("bias", torch.empty(out_features, **factory))
        else:
            self.bias = None
        self._weight_cache = RecomposedWeightCache()
        self.factor_tap: Optional[Callable[[Tensor, Optional[Tensor]], None]] = None
        self.linear_requires_grad: tuple[bool, bool] = (True, True)  # what `to_linear` gives weight, bias
        self.codes: Optional[nn.Parameter]
        self.register_parameter("codes", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The SVD of a weight drawn as `nn.Linear` draws it."""
        w = torch.empty(self.out_features, self.in_features, device=self.U.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self._load_factors(*_svd(w, None))
        if self.bias is not None:
            with torch.no_grad():
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def _load_factors(self, U: Tensor, s: Tensor, Vh: Tensor) -> None:
        k = self.rank
        self.U.copy_(U[:, :k])
        self.s.copy_(s[:k])
        self.Vh.copy_(Vh[:k])

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: Optional[int] = None, svd_dtype: Optional[torch.dtype] = None,
                    tol: Optional[float] = None, trainable_bias: bool = False) -> "FusedSpectralLinear":
        """Factorize `linear` (SVD in float64 on CPU, float32 on GPU unless `svd_dtype` says otherwise).

        `rank` keeps the top singular values; `tol` also drops those ≤ tol (the reference uses 1e-6).
        At full rank the result reproduces `linear` to float32 round-off.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        U, s, Vh = _svd(w, svd_dtype)
        k = s.shape[0] if rank is None else int(rank)
        if tol is not None:
            k = min(k, max(1, int((s > tol).sum())))
        layer = cls(linear.in_features, linear.out_features, rank=k, bias=linear.bias is not None,
                    trainable_bias=trainable_bias, device=w.device, dtype=w.dtype)
        layer._load_factors(U, s, Vh)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        layer.linear_requires_grad = (w.requires_grad, linear.bias is not None and linear.bias.requires_grad)
        return layer

    @property
    def weight(self) -> Tensor:
        """The dense weight U·diag(s)·Vh (out_features × in_features, layer dtype), read-only and
        without gradient; cached until s, U or Vh change (do not write into it)."""
        return self._weight_cache.get(self.U, self.s, self.Vh)

    def to_linear(self) -> nn.Linear:
        """Merge back into an `nn.Linear`; its parameters get the `requires_grad` the original
        layer had (`linear_requires_grad`, recorded by `from_linear`)."""
        return rebuild_linear(self.weight, self.bias, self.linear_requires_grad)

    def enable_codes(self, num_codes: int) -> nn.Parameter:
        """Hold a (num_codes, r) table of per-stream codes, each row a copy of the current s."""
        if not (isinstance(num_codes, int) and num_codes >= 1):
            raise ValueError(f"FusedSpectralLinear.enable_codes: num_codes must be an int >= 1, got {num_codes!r}")
        self.codes = nn.Parameter(self.s.detach().repeat(num_codes, 1), requires_grad=self.s.requires_grad)
        return self.codes

    def disable_codes(self) -> None:
        """Drop the code table; every call uses s again."""
        self.codes = None

    def forward(self, x: Tensor) -> Tensor:
        if self.codes is not None:
            scope = active_codes.get()
            if scope is not None and id(self) in scope[0]:
                if self.factor_tap is not None and torch.is_grad_enabled():
                    self._check_features(x)
                    rows = x.reshape(-1, self.in_features)
                    self.factor_tap(rows, self._low_precision_h(rows, self._autocast_dtype(x)))
                return _spectral_linear(x, self.U, self.codes, self.Vh, self.bias, scope[1], self._weight_cache,
                                        check_index_range=False)
        if self.factor_tap is not None and torch.is_grad_enabled():
            return self._tapped_forward(x, frozen=not self.s.requires_grad)
        return spectral_linear(x, self.U, self.s, self.Vh, self.bias, weight_cache=self._weight_cache)

    def _check_features(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"FusedSpectralLinear: x has shape {tuple(x.shape)}, expected last dim "
                             f"in_features={self.in_features}")

    def _tapped_forward(self, x: Tensor, frozen: bool) -> Tensor:
        """With s frozen and r < d_in, the factorized form in plain autograd ops costs N·r·(d_in + d_out)
        each way, less than W' plus a separate N·d_in·r GEMM for the tap; otherwise the tap gets None,
        or under autocast h from the cached low-precision Vh (the probe's own GEMM, without a per-call
        cast of Vh; docs/design.md §14)."""
        self._check_features(x)
        rows = x.reshape(-1, self.in_features)
        low = self._autocast_dtype(x)
        if not (frozen and self.rank < self.in_features):
            self.factor_tap(rows, self._low_precision_h(rows, low))
            return spectral_linear(x, self.U, self.s, self.Vh, self.bias, weight_cache=self._weight_cache)
        U, Vh, bias = (self.U, self.Vh, self.bias) if low is None else \
            self._weight_cache.factors(self.U, self.Vh, self.bias, low)
        h = F.linear(rows if low is None else rows.to(low), Vh)
        self.factor_tap(rows, h)
        s = self.s.detach()
        # under autocast h ⊙ s is formed in float32 (type promotion) and rounded once by the next GEMM's cast
        y = F.linear(h * (s.to(h.dtype) if low is None else s), U, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _low_precision_h(self, rows: Tensor, low: Optional[torch.dtype]) -> Optional[Tensor]:
        """h = x·Vhᵀ from the cached Vh in the autocast dtype `low` (None outside autocast: the tap's own GEMM)."""
        return None if low is None else F.linear(rows.to(low), self._weight_cache.cast("Vh", self.Vh, low))

    def _autocast_dtype(self, x: Tensor) -> Optional[torch.dtype]:
        """The autocast dtype when autocast is on for x's device, differs from the layer dtype and the
        cached casts may be used (eager); else None."""
        if not torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return None
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if dtype != self.U.dtype else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, dtype={self.U.dtype}")
