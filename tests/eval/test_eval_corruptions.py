"""The 15 corruptions of imse_kernels.eval: shape, range, determinism, and the formulas that have a reference."""
import colorsys

import pytest
import torch

from imse_kernels.eval import corruptions as C


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return torch.cat([x, 0.8 * x, torch.rand(n, 1, 32, 32, generator=g) * 0.2], 1).clamp(0, 1)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_every_corruption_is_valid_deterministic_and_changes_the_image(name):
    x = _images()
    a = C.corrupt(x, name, 3, seed=1)
    b = C.corrupt(x, name, 3, seed=1)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "same seed must give the same images"
    assert torch.equal(a, torch.round(a * 255) / 255), "output lies on the 8-bit grid"
    assert (a - x).abs().mean() > 1e-3, f"{name} left the images unchanged"


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "snow", "fog",
                                  "frost"])
def test_random_corruptions_depend_on_the_seed(name):
    x = _images()
    assert not torch.equal(C.corrupt(x, name, 3, seed=1), C.corrupt(x, name, 3, seed=2))


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "contrast", "brightness", "fog", "zoom_blur"])
def test_damage_grows_with_severity(name):
    x = _images(8)
    err = [(C.corrupt(x, name, s, seed=0) - x).pow(2).mean().item() for s in (1, 3, 5)]
    assert err[0] < err[1] < err[2], err


def test_brightness_matches_an_hsv_round_trip():
    x = _images(2)
    out = C.brightness(x, 4, None)  # c = 0.2, before quantisation
    for n, i, j in [(0, 0, 0), (0, 5, 17), (1, 31, 3), (1, 12, 12)]:
        r, g, b = x[n, :, i, j].tolist()
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        want = colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0))
        assert out[n, :, i, j].tolist() == pytest.approx(want, abs=1e-6)
    black = torch.zeros(1, 3, 4, 4)
    assert torch.allclose(C.brightness(black, 4, None), torch.full_like(black, 0.2))


def test_contrast_scales_around_the_channel_mean():
    x = _images(2)
    mean = x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(C.contrast(x, 5, None), (x - mean) * 0.15 + mean)


def test_glass_blur_at_tiny_sigma_only_permutes_pixels():
    x = _images(3)
    out = C.glass_blur(x, 1, torch.Generator().manual_seed(0))  # sigma 0.05: the blur is the identity
    q = torch.floor(x * 255) / 255
    assert not torch.equal(out, q)
    for n in range(3):
        pix_in = torch.tensor(sorted(map(tuple, q[n].reshape(3, -1).T.tolist())))
        pix_out = torch.tensor(sorted(map(tuple, out[n].reshape(3, -1).T.tolist())))
        torch.testing.assert_close(pix_out, pix_in, rtol=1e-6, atol=1e-6)  # the same multiset of RGB pixels


def test_motion_blur_is_a_one_sided_gaussian_trail():
    x = torch.zeros(1, 3, 21, 21)
    x[:, :, 10, 5] = 1.0
    out = C._motion_blur(x, radius=4, sigma=2.0, angles_deg=torch.tensor([0.0]))
    k = torch.exp(-torch.arange(9.0) ** 2 / 8)
    k /= k.sum()
    # out(y, x) = sum_i k_i * img(y, x + i): the dot at column 5 shows at columns 5, 4, ..., 0 (edge clamp at 0).
    assert out[0, 0, 10, 5].item() == pytest.approx(k[0].item(), rel=1e-5)
    assert out[0, 0, 10, 3].item() == pytest.approx(k[2].item(), rel=1e-5)
    assert out[0, 0, 10, 6:].abs().max() == 0 and out[0, 0, 9].abs().max() == 0
    assert out.sum().item() == pytest.approx(3.0 * k[:6].sum().item(), rel=1e-5)


def test_disk_and_plasma_helpers():
    k = C._disk(1.5, 0.1)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-5) and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    p = C._plasma_fractal(3, 32, 2.0, torch.Generator().manual_seed(0))
    assert p.shape == (3, 32, 32) and p.min() == 0 and p.max() == 1


def test_bad_arguments_are_refused():
    x = _images(1)
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(x, "rain", 3)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        C.corrupt(x[:, :1], "fog", 1)
    assert C.parse_corruptions("all") == list(C.CORRUPTIONS)
    assert C.parse_corruptions("fog, contrast") == ["fog", "contrast"]
    with pytest.raises(ValueError, match="unknown corruption"):
        C.parse_corruptions("fog,hail")


def test_content_scale_coarsens_noise_grain_and_widens_blurs():
    x = _images(2)
    assert not torch.equal(C.corrupt(x, "gaussian_noise", 5, seed=0, scale=4),
                           C.corrupt(x, "gaussian_noise", 5, seed=0))
    delta = C.gaussian_noise(x, 5, torch.Generator().manual_seed(0), 4) - x
    blocks = delta.reshape(2, 3, 8, 4, 8, 4)
    assert torch.allclose(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks), atol=1e-6), "noise grain is 4x4 pixels"
    assert delta.std() == pytest.approx(0.10, rel=0.15)
    dot = torch.zeros(1, 3, 32, 32)
    dot[..., 16, 16] = 1.0
    spread = [(C.defocus_blur(dot, 5, None, k) > 1e-4).sum().item() for k in (1, 4)]
    assert spread[1] > 8 * spread[0]
    with pytest.raises(ValueError, match="scale"):
        C.corrupt(x, "fog", 1, scale=0)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_every_severity_runs_at_the_digits_content_scale(severity):
    """Severities 1-5 at content scale 4 (the CIFAR-10-C files of tools/eval_demo_data.py): the elastic
    transform's sigma at severities 2-3 spans more than the 32-pixel image, which padding must survive."""
    x = _images(2)
    for name in C.CORRUPTIONS:
        y = C.corrupt(x, name, severity, seed=0, scale=4)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1, name


def test_blur_padding_wider_than_the_image_is_scipys_mirror():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 1, 10, 12, dtype=torch.float64)
    assert torch.equal(C._pad(x, (3, 3, 2, 2), "reflect"), torch.nn.functional.pad(x, (3, 3, 2, 2), mode="reflect"))
    y = C.gaussian_blur(x, 9.0, mode="reflect", truncate=3.0)  # radius 27 against sides of 10 and 12
    ref = ndimage.gaussian_filter1d(x.numpy(), 9.0, axis=3, mode="mirror", truncate=3.0)
    ref = ndimage.gaussian_filter1d(ref, 9.0, axis=2, mode="mirror", truncate=3.0)
    assert abs(y.numpy() - ref).max() < 1e-6  # the kernel is float32
