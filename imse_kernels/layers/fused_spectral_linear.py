"""`FusedSpectralLinear`: a drop-in `nn.Linear` whose weight is U·diag(s)·Vh with only s trained."""
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.spectral_linear import spectral_linear
from ..ops.weight_cache import RecomposedWeightCache


def _svd(weight: Tensor, svd_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD, in float64 on CPU and float32 elsewhere unless `svd_dtype` is given."""
    svd_dtype = svd_dtype or (torch.float64 if weight.device.type == "cpu" else torch.float32)
    with torch.no_grad():
        return torch.linalg.svd(weight.detach().to(svd_dtype), full_matrices=False)


class FusedSpectralLinear(nn.Module):
    """y = ((x·Vhᵀ) ⊙ s)·Uᵀ + bias.

    Buffers `U` (d_out × r) and `Vh` (r × d_in) in the layer dtype; `s` (r,) is a float32 Parameter
    (its optimizer state stays float32 under autocast); `bias` is a frozen buffer unless
    `trainable_bias=True`. Build one from a pretrained layer with `from_linear`.

    `factor_tap`, when set, sees every forward under autograd as tap(x_rows, h): h = x·Vhᵀ
    (differentiable in x) where this forward computes it anyway, else None. IMSE's diversity
    probe uses it to take its statistics from h instead of a second GEMM.
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
        # With s frozen and W' cached, one GEMM with W' beats the two factor GEMMs unless the rank is
        # small: d_in·d_out < r·(d_in + d_out), for any number of tokens.
        self._frozen_is_dense = in_features * out_features < rank * (in_features + out_features)
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
        return layer

    @torch.no_grad()
    def weight(self) -> Tensor:
        """The dense weight U·diag(s)·Vh in the layer dtype."""
        acc = torch.float64 if self.U.dtype == torch.float64 else torch.float32
        return ((self.U.to(acc) * self.s.to(acc)) @ self.Vh.to(acc)).to(self.U.dtype)

    def to_linear(self) -> nn.Linear:
        """Merge back into an `nn.Linear` (parameters frozen, like the rest of a spectralized model)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        frozen = not (self.s.requires_grad and torch.is_grad_enabled())
        if self.factor_tap is not None and torch.is_grad_enabled():
            return self._tapped_forward(x, frozen)
        return self._forward(x, frozen)

    def _forward(self, x: Tensor, frozen: bool) -> Tensor:
        U = self.U
        if (frozen and self._frozen_is_dense and x.dtype == U.dtype and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling()):
            # Frozen s: exactly a frozen nn.Linear with the cached W' (the planner's choice, without its cost).
            self._check_features(x)
            return F.linear(x, self._weight_cache.get(U, self.s, self.Vh), self.bias)
        return spectral_linear(x, U, self.s, self.Vh, self.bias, weight_cache=self._weight_cache)

    def _check_features(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"FusedSpectralLinear: x has shape {tuple(x.shape)}, expected last dim "
                             f"in_features={self.in_features}")

    def _tapped_forward(self, x: Tensor, frozen: bool) -> Tensor:
        """With s frozen and r < d_in, the factorized form in plain autograd ops costs N·r·(d_in + d_out)
        each way, less than W' plus a separate N·d_in·r GEMM for the tap; otherwise the tap gets None."""
        self._check_features(x)
        rows = x.reshape(-1, self.in_features)
        if not (frozen and self.rank < self.in_features):
            self.factor_tap(rows, None)
            return self._forward(x, frozen)
        h = F.linear(rows, self.Vh)
        self.factor_tap(rows, h)
        y = F.linear(h * self.s.detach().to(h.dtype), self.U, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, dtype={self.U.dtype}")
