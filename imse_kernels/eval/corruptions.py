"""The 15 ImageNet-C corruption types, written in PyTorch, with CIFAR-10-C's constants for 32-pixel images.

`corrupt(images, name, severity, seed)` after Hendrycks & Dietterich's `make_cifar_c.py`, batched and seeded,
quantized to 8 bits; `scale` adapts the constants to coarse content (the digits use 4). The departures and why
not a library: docs/design.md, section 11, "Corruptions".
"""
import math
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import DataError

Tensor = torch.Tensor

#: ImageNet-C's order: noise, blur, weather, digital.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)

#: ImageNet-C's four extra corruptions (also in CIFAR-10-C and CIFAR-100-C): read from disk, not made here.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

#: Every corruption known by name, in the published order (the 15, then the extra four).
KNOWN_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS

# ----------------------------------------------------------------------------------------------- helpers


def _uniform(gen: torch.Generator, shape, lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).mul_(hi - lo).add_(lo)


def _gauss_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    radius = max(int(truncate * sigma + 0.5), 0)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of every channel of (N, C, H, W) (scikit-image's `gaussian`, mode 'nearest')."""
    if sigma <= 0:
        return x
    k = _gauss_kernel1d(sigma, truncate).to(x)
    r = k.numel() // 2
    if r == 0:
        return x
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(_pad(y, (r, r, 0, 0), mode), k.view(1, 1, 1, -1))
    y = F.conv2d(_pad(y, (0, 0, r, r), mode), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _pad(x: Tensor, pad: tuple[int, int, int, int], mode: str) -> Tensor:
    """`F.pad`; 'reflect' padding wider than the image is applied in steps (torch pads by less than the side
    only), which extends the image periodically as scipy's 'mirror' mode does: an elastic transform's
    sigma at severities 2-3 and content scale 4 spans more than a 32-pixel image."""
    if mode != "reflect":
        return F.pad(x, pad, mode=mode)
    left, right, top, bottom = pad
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return x


def _filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """cv2.filter2D (correlation, BORDER_REFLECT_101) with one kernel for the whole batch."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(y, kernel.to(x)[None, None]).reshape(n, c, h, w)


def _disk(radius: float, alias_blur: float) -> Tensor:
    """ImageNet-C's anti-aliased disk kernel."""
    if radius <= 8:
        coords, ksize = torch.arange(-8, 9, dtype=torch.float32), 3
    else:
        r = int(radius)
        coords, ksize = torch.arange(-r, r + 1, dtype=torch.float32), 5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).float()
    disk /= disk.sum()
    t = torch.arange(ksize, dtype=torch.float32) - (ksize - 1) / 2
    g = torch.exp(-t * t / (2 * alias_blur ** 2))
    g /= g.sum()
    disk = _filter2d(disk[None, None], g[:, None] * g[None, :])[0, 0]
    nz = torch.nonzero(disk.abs() > 1e-12)  # crop the all-zero margin (kernel is symmetric)
    m = int(min(nz[:, 0].min(), nz[:, 1].min(), disk.shape[0] - 1 - nz[:, 0].max(), disk.shape[1] - 1 - nz[:, 1].max()))
    return disk[m:disk.shape[0] - m, m:disk.shape[1] - m]


def _motion_blur(x: Tensor, radius: float, sigma: float, angles_deg: Tensor) -> Tensor:
    """ImageMagick's MotionBlurImage: a one-sided Gaussian-weighted line of width 2*ceil(radius)+1 at a
    per-image angle, integer offsets, edge pixels repeated."""
    n, c, h, w = x.shape
    width = int(2 * math.ceil(radius) + 1)
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(i * i) / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    a = torch.deg2rad(angles_deg.to(torch.float64))
    off_x = torch.ceil(i[None] * torch.cos(a)[:, None] - 0.5).long()  # (N, width)
    off_y = torch.ceil(i[None] * torch.sin(a)[:, None] - 0.5).long()
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    batch = torch.arange(n).view(n, 1, 1)
    xt = x.permute(0, 2, 3, 1)  # N, H, W, C
    out = torch.zeros_like(xt)
    for j in range(width):
        if k[j] < 1e-7:
            break
        rows = (ys + off_y[:, j].view(n, 1, 1)).clamp_(0, h - 1)
        cols = (xs + off_x[:, j].view(n, 1, 1)).clamp_(0, w - 1)
        out += k[j] * xt[batch, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def _clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """ImageNet-C's clipped_zoom: crop the centre, zoom it back up (linear, corner-aligned), trim to size."""
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / zoom)), int(math.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    zh, zw = int(round(ch * zoom)), int(round(cw * zoom))
    res = F.interpolate(crop, size=(zh, zw), mode="bilinear", align_corners=True)
    th, tw = (zh - h) // 2, (zw - w) // 2
    return res[..., th:th + h, tw:tw + w]


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, gen: torch.Generator) -> Tensor:
    """ImageNet-C's diamond-square plasma fractal, one per image: (N, mapsize, mapsize) in [0, 1]."""
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: Tensor) -> Tensor:
        return a / 4 + wibble * _uniform(gen, a.shape, -wibble, wibble)

    while step >= 2:
        corner = m[:, 0::step, 0::step]
        sq = corner + torch.roll(corner, -1, dims=1)
        sq = sq + torch.roll(sq, -1, dims=2)
        m[:, step // 2::step, step // 2::step] = wibbled_mean(sq)
        dr = m[:, step // 2::step, step // 2::step]
        ul = m[:, 0::step, 0::step]
        lt = dr + torch.roll(dr, 1, dims=1) + ul + torch.roll(ul, -1, dims=2)
        m[:, 0::step, step // 2::step] = wibbled_mean(lt)
        tt = dr + torch.roll(dr, 1, dims=2) + ul + torch.roll(ul, -1, dims=1)
        m[:, step // 2::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.amin(dim=(1, 2), keepdim=True)
    return (m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)).float()


def _pow2_at_least(v: int) -> int:
    return 1 << max(int(v) - 1, 1).bit_length()


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])

# ------------------------------------------------------------------------------------------- corruptions


def _grain_shape(x, k):
    return (x.shape[0], x.shape[1], -(-x.shape[2] // k), -(-x.shape[3] // k))


def _up(t, x):
    """Nearest up-sampling of grain-resolution noise to x's size."""
    return t if t.shape[-2:] == x.shape[-2:] else F.interpolate(t, size=x.shape[-2:], mode="nearest")


def gaussian_noise(x, s, gen, k=1):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return x + c * _up(torch.randn(_grain_shape(x, k), generator=gen), x)


def shot_noise(x, s, gen, k=1):
    c = [500, 250, 100, 75, 50][s - 1]
    low = F.adaptive_avg_pool2d(x, _grain_shape(x, k)[2:]) if k > 1 else x
    return x + _up(torch.poisson(low * c, generator=gen) / c - low, x)


def impulse_noise(x, s, gen, k=1):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    flip = _up((torch.rand(_grain_shape(x, k), generator=gen) < c).float(), x) > 0
    salt = _up((torch.rand(_grain_shape(x, k), generator=gen) < 0.5).float(), x)
    return torch.where(flip, salt.to(x.dtype), x)


def defocus_blur(x, s, gen, k=1):
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    return _filter2d(x, _disk(c[0] * k, c[1]))


def glass_blur(x, s, gen, k=1):
    c = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    sigma, delta, iters = c[0] * k, max(1, int(round(c[1] * k))), c[2]
    n, ch, h, w = x.shape
    xq = torch.floor(gaussian_blur(x, sigma) * 255)  # np.uint8 truncates
    xt = xq.permute(2, 3, 0, 1).contiguous()  # H, W, N, C: xt[h, w] is every image's pixel
    moves = torch.randint(-delta, delta, (iters, h, w, n, 2), generator=gen)  # randint excludes +delta
    batch = torch.arange(n)
    for it in range(iters):  # the original swaps pixels one after another, bottom-right to top-left
        for row in range(h - delta, delta, -1):
            for col in range(w - delta, delta, -1):
                d = moves[it, row, col]
                rp, cp = row + d[:, 1], col + d[:, 0]
                here = xt[row, col].clone()
                xt[row, col] = xt[rp, cp, batch]
                xt[rp, cp, batch] = here
    return gaussian_blur(xt.permute(2, 3, 0, 1) / 255.0, sigma)


def motion_blur(x, s, gen, k=1):
    c = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][s - 1]
    return _motion_blur(x, c[0] * k, c[1] * k, _uniform(gen, (x.shape[0],), -45, 45))


def zoom_blur(x, s, gen, k=1):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    zooms = torch.arange(1, top, 0.01, dtype=torch.float64).tolist()
    out = torch.zeros_like(x)
    for z in zooms:
        out += _clipped_zoom(x, z)
    return (x + out) / (len(zooms) + 1)


def snow(x, s, gen, k=1):
    c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    n, _, h, w = x.shape
    layer = c[0] + c[1] * torch.randn((n, 1) + _grain_shape(x, k)[2:], generator=gen)
    layer = _up(_clipped_zoom(layer, c[2]), x)  # flakes k times larger
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer)
    layer = torch.round(layer.clamp(0, 1) * 255) / 255
    layer = _motion_blur(layer, c[4] * k, c[5] * k, _uniform(gen, (n,), -135, -45))
    layer = torch.round(layer * 255) / 255
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + torch.rot90(layer, 2, dims=(2, 3))


def _frost_texture(n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """Procedural stand-in for ImageNet-C's frost photographs: bluish-white patches of ice crystals."""
    size = _pow2_at_least(max(h, w))
    patches = _plasma_fractal(n, size, 2.0, gen)[:, None, :h, :w]
    crystals = torch.zeros(n, 1, h, w)
    for _ in range(3):
        seeds = (torch.rand((n, 1, h, w), generator=gen) < 0.04).float()
        crystals += _motion_blur(seeds, max(h, w) / 6, max(h, w) / 10, _uniform(gen, (n,), -180, 180))
    crystals /= crystals.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    ice = (0.6 * patches + 0.9 * crystals * (0.5 + patches)).clamp(0, 1)
    tint = torch.tensor([0.83, 0.91, 1.0]).view(1, 3, 1, 1)
    return ice * tint


def frost(x, s, gen, k=1):
    c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    return c[0] * x + c[1] * _frost_texture(x.shape[0], x.shape[2], x.shape[3], gen)


def fog(x, s, gen, k=1):
    c = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    n, _, h, w = x.shape
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    plasma = _plasma_fractal(n, _pow2_at_least(max(h, w)), c[1], gen)[:, None, :h, :w]
    return (x + c[0] * plasma) * max_val / (max_val + c[0])


def brightness(x, s, gen, k=1):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    # HSV round trip that changes V only: scaling RGB by V'/V keeps hue and saturation; black becomes grey V'.
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


def contrast(x, s, gen, k=1):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def elastic_transform(x, s, gen, k=1):
    n, _, h, w = x.shape
    size = min(h, w)
    c = [(size * 0, size * 0, size * 0.08), (size * 0.05, size * 0.2, size * 0.07),
         (size * 0.08, size * 0.06, size * 0.06),
         (size * 0.1, size * 0.04, size * 0.05), (size * 0.1, size * 0.03, size * 0.03)][s - 1]
    alpha, sigma, affine = c[0] * k, c[1] * k, c[2]
    centre = torch.tensor([w // 2, h // 2], dtype=torch.float64)  # (x, y), as cv2 points
    sq = size // 3
    pts1 = torch.stack([centre + sq, torch.stack([centre[0] + sq, centre[1] - sq]), centre - sq])  # 3 x 2
    pts2 = pts1[None] + _uniform(gen, (n, 3, 2), -affine, affine)
    ones = torch.ones(3, 1, dtype=torch.float64)
    # dst = M @ [src, 1]; warpAffine samples src at M^-1(dst), i.e. the map pts2 -> pts1.
    inv = torch.linalg.solve(torch.cat([pts2, ones.expand(n, 3, 1)], 2), pts1[None].expand(n, 3, 2))  # (N, 3, 2)
    dx = gaussian_blur(_uniform(gen, (n, 1, h, w), -1, 1).float(), sigma, mode="reflect", truncate=3.0) * alpha
    dy = gaussian_blur(_uniform(gen, (n, 1, h, w), -1, 1).float(), sigma, mode="reflect", truncate=3.0) * alpha
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    qx = xs[None] + dx[:, 0].double()
    qy = ys[None] + dy[:, 0].double()
    q = torch.stack([qx, qy, torch.ones_like(qx)], -1)  # N, H, W, 3
    p = torch.einsum("nhwk,nkj->nhwj", q, inv)  # source pixel coordinates (x, y)
    grid = torch.stack([2 * p[..., 0] / (w - 1) - 1, 2 * p[..., 1] / (h - 1) - 1], -1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def pixelate(x, s, gen, k=1):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c / k)), max(1, int(w * c / k))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


def jpeg_compression(x, s, gen, k=1):
    import io

    import numpy as np
    from PIL import Image

    quality = [80, 65, 58, 50, 40][s - 1]
    imgs = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in imgs:  # PIL's encoder, as make_cifar_c.py
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


_FUNCS: dict[str, Callable[..., Tensor]] = {name: globals()[name] for name in CORRUPTIONS}


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """The generator seed for one (corruption, severity) domain: stable across runs and processes."""
    return (seed * 1_000_003 + (CORRUPTIONS.index(name) + 1) * 7_919 + severity * 104_729) % (2 ** 63)


def corrupt(images: Tensor, name: str, severity: int, seed: Union[int, torch.Generator] = 0, scale: int = 1) -> Tensor:
    """Corrupt a CPU batch (N, 3, H, W) of floats in [0, 1]; returns floats in [0, 1] on the 8-bit grid.

    `scale` is the content scale: images whose detail is `scale` pixels wide (e.g. 8-pixel scans upsampled 4x)
    get noise with a grain of `scale` pixels and blur, shuffle, displacement and pixelation extents `scale`
    times CIFAR-10-C's; photometric corruptions (brightness, contrast, fog, frost) and JPEG do not change.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if int(severity) != severity or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
    gen = (seed if isinstance(seed, torch.Generator)
           else torch.Generator().manual_seed(corruption_seed(seed, name, severity)))
    x = images.detach().to("cpu", torch.float32)
    out = _FUNCS[name](x, int(severity), gen, int(scale))
    return torch.round(out.clamp(0, 1) * 255) / 255


def parse_corruptions(spec: Union[str, Sequence[str], None]) -> list[str]:
    """'all' / None -> the 15 types; otherwise a comma-separated list, each one of the 15 (what `corrupt` makes)."""
    if spec is None or spec == "all":
        return list(CORRUPTIONS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in names if s not in CORRUPTIONS]
    if bad:
        extra = [s for s in bad if s in EXTRA_CORRUPTIONS]
        raise ValueError(f"unknown corruption(s) {', '.join(bad)}; choose from {', '.join(CORRUPTIONS)}"
                         + (f" ({', '.join(extra)}: ImageNet-C's extra corruptions, read from disk with --data "
                            "imagenet-c or cifar10-c, not made here)" if extra else ""))
    return names


def corruption_order(names: Sequence[str]) -> list[str]:
    """`names` in the published order (KNOWN_CORRUPTIONS), unknown names after them in sorted order."""
    rank = {n: i for i, n in enumerate(KNOWN_CORRUPTIONS)}
    return sorted(dict.fromkeys(names), key=lambda n: (rank.get(n, len(rank)), n))


def select_corruptions(spec: Union[str, Sequence[str], None], available: Sequence[str], where: str) -> list[str]:
    """The corruptions to run from those on disk: 'all' / None -> every available one in the published order;
    otherwise a comma-separated list (its order kept), each of which must be available. `where` names the
    data folder in the messages."""
    present = corruption_order(available)
    if spec is None or spec == "all":
        if not present:
            raise DataError(where, "no corruption found", "check --data-dir (the folder that holds the corruptions)")
        return present
    names = list(dict.fromkeys(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()))
    missing = [n for n in names if n not in present]
    if not names or missing:
        have = ", ".join(present) if present else "none"
        raise DataError(where, f"no corruption {', '.join(missing) or repr(spec)} here",
                        f"choose from what is present: {have}")
    return names
