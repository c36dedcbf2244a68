"""CoTTA's test-time augmentations in plain torch (torchvision is not a dependency of this library).

The official ImageNet set (qinenergy/cotta, imagenet/cotta.py `get_tta_transforms` and imagenet/my_transforms.py)
on a batch of [0, 1] images, one draw of the random parameters per batch; where it differs from the official
transforms (the affine samples with border padding): docs/design.md, sections 11 and 12.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def grayscale(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB images."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def blend(x: Tensor, other: Tensor, factor: float) -> Tensor:
    """factor·x + (1 − factor)·other, clipped to [0, 1] (torchvision's `_blend`)."""
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: float) -> Tensor:
    return blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: float) -> Tensor:
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: float) -> Tensor:
    return blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, factor: float) -> Tensor:
    """Shift the HSV hue of RGB images in [0, 1] by `factor` turns (torchvision's `adjust_hue`, the official
    ColorJitterPro's): h ← (h + factor) mod 1, saturation and value kept. +1/6 turns red into yellow.

    The hexcone model: with v = max, c = max − min, the hue in sixths is (g − b)/c (mod 6) where r is the
    maximum, (b − r)/c + 2 where g is, (r − g)/c + 4 otherwise (r wins ties, then g); a grey pixel (c = 0)
    has hue 0. Back to RGB: channel n ∈ {r: 5, g: 3, b: 1} is v − c·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6h) mod 6.
    """
    r, g, b = x.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    sixths = torch.where(v == r, torch.remainder((g - b) / safe, 6.0),
                         torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(c > 0, sixths / 6.0, torch.zeros_like(c))
    h = torch.remainder(h + factor, 1.0)

    def channel(n: float) -> Tensor:
        k = torch.remainder(n + 6.0 * h, 6.0)
        return v - c * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)

    return torch.stack((channel(5.0), channel(3.0), channel(1.0)), -3)


def adjust_gamma(x: Tensor, gamma: float) -> Tensor:
    """x^gamma (clipped away from 0 first, as the official ColorJitterPro does against NaN gradients)."""
    return x.clamp(1e-8, 1.0).pow(gamma).clamp(0.0, 1.0)


def affine(x: Tensor, angle_deg: float, translate_px: tuple[float, float], scale: float) -> Tensor:
    """Rotate by `angle_deg` about the centre, scale, then translate by (dx, dy) pixels; bilinear, edge values
    outside the image. Output pixel p samples the input at R⁻¹(p − c − t)/scale + c."""
    b, _, h, w = x.shape
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    tx, ty = translate_px[0] / (w / 2), translate_px[1] / (h / 2)  # in normalised coordinates
    theta = torch.tensor([[cos, sin * h / w, -(cos * tx + sin * ty * h / w)],
                          [-sin * w / h, cos, sin * tx * w / h - cos * ty]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(b, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 5) -> Tensor:
    """Separable gaussian blur with reflect padding (torchvision's GaussianBlur on tensors)."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    p = kernel_size // 2
    y = F.pad(x, (p, p, p, p), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


@dataclass(frozen=True)
class CoTTAAugment:
    """One random augmentation of a batch per call: `augment(x, generator, noise_generator)`.

    Ranges are the official ImageNet ones (`soft=False`); `soft=True` gives the official soft ranges.
    `generator` is a CPU `torch.Generator` (the batch's parameters), `noise_generator` one on `x.device`.
    """

    soft: bool = False
    noise_std: float = 0.005
    flip_prob: float = 0.5

    def ranges(self) -> dict:
        s = self.soft
        return {"brightness": (0.8, 1.2) if s else (0.6, 1.4), "contrast": (0.85, 1.15) if s else (0.7, 1.3),
                "saturation": (0.75, 1.25) if s else (0.5, 1.5), "hue": (-0.03, 0.03) if s else (-0.06, 0.06),
                "gamma": (0.85, 1.15) if s else (0.7, 1.3), "degrees": (-8.0, 8.0) if s else (-15.0, 15.0),
                "scale": (0.95, 1.05) if s else (0.9, 1.1), "sigma": (0.001, 0.25) if s else (0.001, 0.5)}

    def __call__(self, x: Tensor, generator: torch.Generator, noise_generator: torch.Generator) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CoTTAAugment: expected RGB image batches (B, 3, H, W), got {tuple(x.shape)}")
        r = self.ranges()
        order = torch.randperm(5, generator=generator).tolist()
        u = torch.rand(11, generator=generator, dtype=torch.float64).tolist()

        def draw(i: int, lo_hi: tuple[float, float]) -> float:
            return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u[i]

        y = x.clamp(0.0, 1.0)
        ops = ((adjust_brightness, "brightness"), (adjust_contrast, "contrast"), (adjust_saturation, "saturation"),
               (adjust_hue, "hue"), (adjust_gamma, "gamma"))
        for i in order:
            fn, name = ops[i]
            y = fn(y, draw(i, r[name]))
        h, w = y.shape[-2:]
        # the official translate is 1/16 of the image padded to twice its size, whole pixels
        dx, dy = round(draw(5, (-w / 8, w / 8))), round(draw(6, (-h / 8, h / 8)))
        y = affine(y, draw(7, r["degrees"]), (dx, dy), draw(8, r["scale"]))
        y = gaussian_blur(y, draw(9, r["sigma"]))
        if u[10] < self.flip_prob:
            y = y.flip(-1)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=noise_generator, dtype=y.dtype, device=y.device)
        return y.clamp(0.0, 1.0)
