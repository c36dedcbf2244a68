"""The SVF parametrisation (docs/design.md, section 15): singular values s from frozen S and a trained z.

    m = max_mult · sigmoid(z)   (mask "sigmoid", Transformer²'s)   or   m = z   (mask "identity", a plain scale)
    s = S ⊙ m · ΣS / Σ(S ⊙ m)    (rescale=True: Transformer²'s norm-preserving rescale; else s = S ⊙ m)

Computed per step in O(r) (O(B·r) for a (B, r) table of per-sample codes, one rescale per row), so the
layer never recomposes U·diag(s)·Vh to train and autograd carries ds back to z (or to mixed codes).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

MASKS = ("sigmoid", "identity")


@dataclass(frozen=True)
class SVFConfig:
    """How z becomes a mask and whether the rescale applies; `z_init` is the z that `SVFLinear` starts from
    (any constant z reproduces S exactly when rescale is on; with mask "identity" and no rescale, 1 does)."""
    mask: str = "sigmoid"
    rescale: bool = True
    max_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.mask not in MASKS:
            raise ValueError(f"SVF: mask must be one of {MASKS}, got {self.mask!r}")
        if not (isinstance(self.max_mult, (int, float)) and self.max_mult > 0):
            raise ValueError(f"SVF: max_mult must be a positive number, got {self.max_mult!r}")

    @property
    def default_z(self) -> float:
        """Transformer²'s init value 0.1 for the sigmoid mask (its noise, 0.01·randn, is left out: the
        adapted model then starts exactly at the pretrained one); 1.0, the identity, for a plain scale."""
        return 0.1 if self.mask == "sigmoid" else 1.0


def svf_mask(z: Tensor, config: SVFConfig) -> Tensor:
    """m(z) for z of shape (r,) or (B, r)."""
    if config.mask == "sigmoid":
        m = torch.sigmoid(z)
        return m * config.max_mult if config.max_mult != 1.0 else m
    return z


def svf_scale(S: Tensor, z: Tensor, config: SVFConfig) -> Tensor:
    """s = S ⊙ m(z) · ΣS / Σ(S ⊙ m(z)), row by row for z of shape (B, r); in the dtype of S and z."""
    if z.shape[-1] != S.shape[-1] or z.dim() not in (1, 2):
        raise ValueError(f"svf_scale: z must be (r,) or (B, r) with r={S.shape[-1]}, got shape {tuple(z.shape)}")
    a = S * svf_mask(z, config)
    if config.rescale:
        a = a * (S.sum() / a.sum(-1, keepdim=True))
    return a
