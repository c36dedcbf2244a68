"""`SVFLinear`: singular-value fine-tuning of one linear layer through the fused spectral op.

y = ((x·Vhᵀ) ⊙ s)·Uᵀ + b with s = S ⊙ m(z) · ΣS/Σ(S ⊙ m(z)) (parametrization.py). U, S, Vh and the bias
are frozen buffers; z is the trained Parameter. The op's s-only backward gives ds, autograd's O(r) chain
gives dz: no recomposed weight and no weight-sized gradient (docs/design.md, section 15).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ..layers.conv1d import conv1d_shell, is_conv1d, linear_weight, rebuild_conv1d, rebuild_linear
from ..ops import RecomposedWeightCache, spectral_linear
from .decomposition import svd_factors
from .experts import active_mixture
from .parametrization import SVFConfig, svf_scale


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class SVFLinear(nn.Module):
    """A linear layer (or GPT-2 Conv1D) whose singular values are scaled by a trained vector z.

    Buffers: `U` (d_out × r) and `Vh` (r × d_in) in the layer dtype, `S` (r,) in float32 (float64 for a
    float64 layer), `bias`; Parameter `z` (r,) in S's dtype. `experts` (K × r, see `set_experts`) holds
    K trained z vectors to mix per sample inside `imse_kernels.svf.mix_experts`. With z frozen (or grad
    off) s is computed once per change of z and the op serves the layer as one GEMM with a cached W'.
    """

    def __init__(self, U: Tensor, S: Tensor, Vh: Tensor, bias: Optional[Tensor] = None,
                 config: SVFConfig = SVFConfig(), z_init: Optional[float] = None) -> None:
        super().__init__()
        if U.dim() != 2 or S.dim() != 1 or Vh.dim() != 2 or U.shape[1] != S.shape[0] or Vh.shape[0] != S.shape[0]:
            raise ValueError(f"SVFLinear: expected U (d_out, r), S (r,), Vh (r, d_in); got U {tuple(U.shape)}, "
                             f"S {tuple(S.shape)}, Vh {tuple(Vh.shape)}")
        if bias is not None and tuple(bias.shape) != (U.shape[0],):
            raise ValueError(f"SVFLinear: bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")
        dtype = U.dtype
        self.config = config
        self.out_features, self.rank, self.in_features = U.shape[0], S.shape[0], Vh.shape[1]
        sdtype = _acc_dtype(dtype)
        self.register_buffer("U", U.detach().to(dtype).contiguous())
        self.register_buffer("S", S.detach().to(sdtype).contiguous())
        self.register_buffer("Vh", Vh.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        z0 = config.default_z if z_init is None else float(z_init)
        self.z = nn.Parameter(torch.full_like(self.S, z0))
        self.experts: Optional[nn.Parameter]
        self.register_parameter("experts", None)
        self._weight_cache = RecomposedWeightCache()
        self._frozen_s: Optional[tuple[tuple, Tensor]] = None
        self.linear_requires_grad: tuple[bool, bool] = (True, True)  # what `to_module` gives weight, bias
        self.__dict__["conv1d_shell"] = None  # the GPT-2 Conv1D this layer replaced (not a submodule)

    @classmethod
    def from_module(cls, module: nn.Module, factors: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                    svd_dtype: torch.dtype = torch.float32, config: SVFConfig = SVFConfig(),
                    z_init: Optional[float] = None) -> "SVFLinear":
        """Factorize an nn.Linear or a Conv1D (through its transpose), or take precomputed `factors`
        (U, S, Vh of the weight in nn.Linear layout, e.g. from a decomposition file)."""
        weight, bias = linear_weight(module)
        if factors is None:
            factors = svd_factors(weight, svd_dtype)
        U, S, Vh = factors
        if (U.shape[0], Vh.shape[1]) != tuple(weight.shape):
            raise ValueError(f"SVFLinear.from_module: factors U {tuple(U.shape)}, Vh {tuple(Vh.shape)} do not "
                             f"match the weight (d_out, d_in) = {tuple(weight.shape)}")
        layer = cls(U.to(weight.device, weight.dtype), S.to(weight.device), Vh.to(weight.device, weight.dtype),
                    bias, config, z_init)
        layer.linear_requires_grad = (weight.requires_grad, bias is not None and bias.requires_grad)
        if is_conv1d(module):
            layer.__dict__["conv1d_shell"] = conv1d_shell(module)
        return layer

    # ---------------------------------------------------------------------------------- the scale

    def scale(self, z: Optional[Tensor] = None) -> Tensor:
        """s for `z` (default: the layer's own z; a (B, r) z gives one row per sample)."""
        return svf_scale(self.S, self.z if z is None else z, self.config)

    def _frozen_scale(self) -> Tensor:
        """s without gradient, recomputed only when z or S change (so the op's cached W' stays valid)."""
        key = (self.z.data_ptr(), self.z._version, self.S.data_ptr(), self.S._version, self.z.device)
        if self._frozen_s is None or self._frozen_s[0] != key:
            with torch.no_grad():
                self._frozen_s = (key, self.scale())
        return self._frozen_s[1]

    # ---------------------------------------------------------------------------------- experts

    def set_experts(self, experts: Optional[Tensor], trainable: bool = False) -> None:
        """Hold K expert z vectors (K × r) for per-sample mixing; None removes them."""
        if experts is None:
            self.experts = None
            return
        if not isinstance(experts, Tensor) or experts.dim() != 2 or experts.shape[1] != self.rank:
            got = tuple(experts.shape) if isinstance(experts, Tensor) else type(experts).__name__
            raise ValueError(f"SVFLinear.set_experts: experts must be a (K, r={self.rank}) tensor, got {got}")
        self.experts = nn.Parameter(experts.detach().to(self.S.device, self.S.dtype).clone(), requires_grad=trainable)

    # ---------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        mixture = active_mixture(self)
        if mixture is not None:
            return self._mixed_forward(x, *mixture)
        if torch.is_grad_enabled() and self.z.requires_grad:
            self._weight_cache.clear()  # training: keep no weight-sized state
            return spectral_linear(x, self.U, self.scale(), self.Vh, self.bias)
        return spectral_linear(x, self.U, self._frozen_scale(), self.Vh, self.bias, weight_cache=self._weight_cache)

    def _mixed_forward(self, x: Tensor, alpha: Tensor, index: Tensor, own_mask: bool) -> Tensor:
        """Sample b uses s_b = scale(α_b · Z): one (B, r) table of codes through the per-sample path."""
        if self.experts is None:
            raise ValueError("mix_experts: a mixed layer has no experts; call set_experts first")
        if x.dim() < 2 or x.shape[0] != alpha.shape[0]:
            raise ValueError(f"mix_experts: alpha has B={alpha.shape[0]} rows (one per sample) but the layer got "
                             f"x of shape {tuple(x.shape)}; its first dim must be the batch")
        codes = alpha.to(self.experts.dtype) @ self.experts
        config = self.config if own_mask else SVFConfig("identity", self.config.rescale)
        table = svf_scale(self.S, codes, config)
        return spectral_linear(x, self.U, table, self.Vh, self.bias, index=index)

    # ---------------------------------------------------------------------------------- merging

    @torch.no_grad()
    def merged_weight(self, s: Optional[Tensor] = None) -> Tensor:
        """W = U·diag(s)·Vh (d_out × d_in, layer dtype), accumulated in float32 (float64 for float64)."""
        s = self.scale() if s is None else s
        acc = _acc_dtype(self.U.dtype)
        return ((self.U.to(acc) * s.to(acc)) @ self.Vh.to(acc)).to(self.U.dtype)

    def to_module(self, s: Optional[Tensor] = None) -> nn.Module:
        """Merge into an nn.Linear (a Conv1D where this layer replaced one) with weight U·diag(s)·Vh and
        the `requires_grad` the original layer had."""
        weight, shell = self.merged_weight(s), self.__dict__["conv1d_shell"]
        if shell is not None:
            return rebuild_conv1d(shell, weight, self.bias, self.linear_requires_grad)
        return rebuild_linear(weight, self.bias, self.linear_requires_grad)

    def extra_repr(self) -> str:
        k = 0 if self.experts is None else self.experts.shape[0]
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"mask={self.config.mask}, rescale={self.config.rescale}, experts={k}, dtype={self.U.dtype}")
