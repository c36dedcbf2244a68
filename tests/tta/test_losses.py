"""Losses of IMSE against hand-written PyTorch (the official formulas)."""
import math

import pytest
import torch
import torch.nn.functional as F

from imse_kernels.losses import (
    diversity_loss,
    entropy_threshold,
    expert_alignment_moments,
    layer_diversity,
    lowest_k,
    lowest_k_mean,
    reliable_entropy,
    reliable_mask,
    softmax_entropy,
    std_from_moments,
)


def official_layer_term(x, Vh, ratio):
    """The official SVDLinear.variance_maximization on a (B, T, d) input."""
    normalized = x / x.norm(p=2, dim=2, keepdim=True)
    std = F.linear(normalized, Vh).std(dim=(0, 1))
    lowk = min(int(std.size(0) * ratio), std.size(0) - 1)
    sorted_std, _ = torch.sort(std, dim=0, descending=False)
    return std[std < sorted_std[lowk]].mean()


def test_softmax_entropy_matches_definition():
    logits = torch.randn(7, 5, dtype=torch.float64)
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    expected = -(p * torch.log(p)).sum(1)
    torch.testing.assert_close(softmax_entropy(logits), expected, rtol=1e-12, atol=1e-12)
    assert softmax_entropy(logits.float()).dtype == torch.float32
    assert softmax_entropy(logits.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="batch, classes"):
        softmax_entropy(torch.randn(3))


def test_reliable_filter_and_empty_selection():
    assert entropy_threshold(1000, 0.4) == pytest.approx(0.4 * math.log(1000))
    ent = torch.tensor([0.1, 2.0, 0.5, float("nan")], requires_grad=True)
    mask = reliable_mask(ent.detach(), 1.0)
    assert mask.tolist() == [True, False, True, False]
    loss = reliable_entropy(ent, mask)
    assert loss.item() == pytest.approx(0.3)
    loss.backward()
    assert ent.grad.tolist()[:3] == [0.5, 0.0, 0.5]
    none = torch.tensor([3.0, 4.0], requires_grad=True)
    empty = reliable_entropy(none, reliable_mask(none.detach(), 1.0))
    assert empty.item() == 0.0 and empty.requires_grad  # finite, and the graph still exists
    empty.backward()
    assert none.grad.abs().sum() == 0
    with pytest.raises(ValueError):
        entropy_threshold(1)


def test_moments_give_the_unbiased_std_over_batch_and_tokens():
    x = torch.randn(3, 11, 16, dtype=torch.float64) + 0.3
    Vh = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0][:12]
    m = expert_alignment_moments(x, Vh)
    assert m.count == 33 and m.sum.shape == (12,)
    expected = F.linear(x / x.norm(dim=2, keepdim=True), Vh).std(dim=(0, 1))
    torch.testing.assert_close(std_from_moments(m), expected, rtol=1e-10, atol=1e-12)
    m32 = expert_alignment_moments(x.float(), Vh.float())
    torch.testing.assert_close(std_from_moments(m32), expected.float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 rows"):
        expert_alignment_moments(torch.randn(1, 16), Vh)
    with pytest.raises(ValueError, match="does not match"):
        expert_alignment_moments(torch.randn(2, 15), Vh)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.05])
def test_layer_term_and_its_gradient_match_the_official_code(ratio):
    x = torch.randn(4, 9, 24, dtype=torch.float64, requires_grad=True)
    Vh = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))[0][:20].contiguous()
    ours = layer_diversity(expert_alignment_moments(x, Vh), ratio)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = official_layer_term(x, Vh, ratio)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-10)


def test_lowest_k_is_sort_then_average_first_k():
    std = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert lowest_k(5, 1.0) == 4 and lowest_k(5, 0.5) == 2 and lowest_k(768, 1.0) == 767
    assert lowest_k_mean(std, 1.0).item() == pytest.approx((0.1 + 0.3 + 0.5 + 0.7) / 4)
    assert lowest_k_mean(std, 0.5).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="selects no expert"):
        lowest_k(5, 0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lowest_k(5, 1.5)


def test_diversity_loss_sums_layers_and_divides_by_blocks():
    xs = [torch.randn(2, 5, 8) for _ in range(4)]
    Vhs = [torch.linalg.qr(torch.randn(8, 8))[0] for _ in range(4)]
    moments = [expert_alignment_moments(x, v) for x, v in zip(xs, Vhs)]
    expected = sum(official_layer_term(x, v, 1.0) for x, v in zip(xs, Vhs)) / 2
    torch.testing.assert_close(diversity_loss(moments, 1.0, num_blocks=2), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no layer statistics"):
        diversity_loss([], 1.0, 3)


def test_moments_under_bf16_autocast_are_float32_and_close():
    x = torch.randn(2, 33, 32)
    Vh = torch.linalg.qr(torch.randn(32, 32))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = expert_alignment_moments(x, Vh)
    assert m.sum.dtype == torch.float32
    torch.testing.assert_close(std_from_moments(m), std_from_moments(expert_alignment_moments(x, Vh)),
                               rtol=3e-2, atol=3e-3)


def test_degenerate_expert_gives_finite_gradient():
    x = torch.zeros(2, 3, 4)
    x[..., 0] = 1.0  # every token identical: every std is 0
    x.requires_grad_(True)
    Vh = torch.eye(4)
    loss = layer_diversity(expert_alignment_moments(x, Vh), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_moments_from_a_given_projection_match_the_gemm_path():
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    Vh = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))[0][:10].contiguous()
    rows = x.reshape(-1, 24)
    direct = layer_diversity(expert_alignment_moments(rows, Vh), 1.0)
    given = layer_diversity(expert_alignment_moments(rows, Vh, h=F.linear(rows, Vh)), 1.0)
    torch.testing.assert_close(given, direct, rtol=1e-12, atol=1e-14)
    g_direct, = torch.autograd.grad(direct, x)
    g_given, = torch.autograd.grad(given, x)
    torch.testing.assert_close(g_given, g_direct, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="is not x·Vhᵀ"):
        expert_alignment_moments(rows, Vh, h=torch.zeros(21, 9, dtype=torch.float64))
