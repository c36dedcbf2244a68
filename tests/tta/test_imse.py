"""IMSE adapter: one step against plain PyTorch, frozen parameters, robustness, the code bank in use."""
import copy
import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit
from torch import nn

from imse_kernels import FusedSpectralLinear, spectral_layers, spectralize
from imse_kernels.tta import IMSE, IMSEConfig, Retrieval

# ------------------------------------------------------------------ the step written out by hand

class RefSVDLinear(nn.Module):
    """The official SVDLinear: W = U·diag(s)·Vh rebuilt every call, then F.linear."""

    def __init__(self, layer: FusedSpectralLinear):
        super().__init__()
        self.register_buffer("U", layer.U.clone())
        self.register_buffer("Vh", layer.Vh.clone())
        self.register_buffer("bias", layer.bias.clone())
        self.s = nn.Parameter(layer.s.detach().clone())

    def forward(self, x):
        return F.linear(x, self.U @ torch.diag(self.s.to(self.U.dtype)) @ self.Vh, self.bias)


def reference_model(spectral_model):
    ref = copy.deepcopy(spectral_model)
    for name, layer in spectral_layers(ref).items():
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, RefSVDLinear(layer))
    return ref


def reference_steps(ref, xs, depth, lr=7e-3, rho=0.05, lam=50.0, margin=0.4, betas=(0.9, 0.999), eps=1e-8):
    refs = {n: m for n, m in ref.named_modules() if isinstance(m, RefSVDLinear)}
    adapted = [m.s for n, m in refs.items() if int(n.split(".")[1]) < depth - 3]
    for m in refs.values():
        m.s.requires_grad_(any(m.s is p for p in adapted))
    stds = []

    def hook(mod, args):
        x = args[0]
        std = F.linear(x / x.norm(p=2, dim=2, keepdim=True), mod.Vh).std(dim=(0, 1))
        lowk = min(int(std.size(0) * 1.0), std.size(0) - 1)
        stds.append(std[std < torch.sort(std).values[lowk]].mean())

    for n, m in refs.items():
        if int(n.split(".")[1]) >= depth - 3:
            m.register_forward_pre_hook(hook)
    e0 = margin * math.log(10)
    ent = lambda z: -(z.softmax(1) * z.log_softmax(1)).sum(1)  # noqa: E731
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in adapted]
    outs, reliable = [], []
    for t, x in enumerate(xs, start=1):
        stds.clear()
        out = ref(x)
        e = ent(out)
        ids1 = torch.where(e < e0)
        loss = e[ids1].mean(0) - lam * sum(stds) / 3
        grads = torch.autograd.grad(loss, adapted)
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        old = [p.detach().clone() for p in adapted]
        with torch.no_grad():
            for p, g in zip(adapted, grads):
                p.add_(g * (rho / (norm + 1e-12)))
        stds.clear()
        e2 = ent(ref(x))[ids1]
        ids2 = torch.where(e2 < e0)
        loss2 = e2[ids2].mean(0) - lam * sum(stds) / 3
        grads2 = torch.autograd.grad(loss2, adapted)
        with torch.no_grad():
            for i, (p, g, o) in enumerate(zip(adapted, grads2, old)):
                m, v = state[i]
                m = betas[0] * m + (1 - betas[0]) * g
                v = betas[1] * v + (1 - betas[1]) * g * g
                state[i] = (m, v)
                p.copy_(o - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
        outs.append(out.detach())
        reliable.append(len(ids1[0]))
    return outs, reliable


def test_two_steps_equal_the_hand_written_reference_in_float64():
    model = tiny_vit(dtype=torch.float64)
    spectralize(model)
    ref = reference_model(model)
    adapter = IMSE(model)
    xs = [torch.randn(8, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    ref_out, reliable = reference_steps(ref, xs, depth=4)
    assert all(0 < k < 8 for k in reliable)  # the filter really selects
    # the first prediction is float64 throughout; later ones see s (float32) that differ by Adam's round-off
    for x, expected, tol in zip(xs, ref_out, (1e-12, 1e-6)):
        torch.testing.assert_close(adapter(x), expected, rtol=tol, atol=tol)
    refs = {n: m for n, m in ref.named_modules() if isinstance(m, RefSVDLinear)}
    for name, layer in adapter.layers.items():
        torch.testing.assert_close(layer.s.detach(), refs[name].s.detach(), rtol=0, atol=1e-6)
    assert adapter.steps_taken == 2 and adapter.skipped_steps == 0


@pytest.mark.parametrize("adapt_blocks", [None, (1,)])
def test_only_the_configured_s_change(adapt_blocks):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = IMSE(model, IMSEConfig(adapt_blocks=adapt_blocks))
    start = {n: m.s.detach().clone() for n, m in adapter.layers.items()}
    frozen_state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".s")}
    adapter(torch.randn(8, 3, 32, 32))
    trained = {0} if adapt_blocks is None else set(adapt_blocks)
    for name, layer in adapter.layers.items():
        changed = not torch.equal(layer.s.detach(), start[name])
        assert changed == (int(name.split(".")[1]) in trained), name
    for k, v in model.state_dict().items():
        if not k.endswith(".s"):
            assert torch.equal(v, frozen_state[k]), k  # U, Vh, bias, LayerNorm, patch embedding, head
    assert any(k.endswith("norm1.weight") for k in before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.s" for n in adapter.adapted]


def test_non_finite_passes_skip_the_update():
    model = tiny_vit()
    adapter = IMSE(model, IMSEConfig(stats_window=8))
    adapter(torch.randn(8, 3, 32, 32))
    s0 = {n: m.s.detach().clone() for n, m in adapter.layers.items()}
    opt0 = copy.deepcopy(adapter.optimizer.state_dict())
    bad = torch.randn(8, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    adapter(bad)  # first pass not finite
    assert adapter.skipped_steps == 1
    calls = {"n": 0}
    real = adapter.probe.moments_fn

    def nan_in_second_pass(x, Vh, h=None):
        calls["n"] += 1
        m = real(x, Vh, h=h)
        return m._replace(sum=m.sum * float("nan")) if calls["n"] > 12 else m

    adapter.probe.moments_fn = nan_in_second_pass
    adapter(torch.randn(8, 3, 32, 32))  # second pass not finite: the ascent is undone, no Adam step
    assert adapter.skipped_steps == 2 and adapter.steps_taken == 1
    for n, m in adapter.layers.items():
        assert torch.equal(m.s.detach(), s0[n]) and torch.isfinite(m.s).all()
    assert torch.equal(adapter.optimizer.state_dict()["state"][0]["exp_avg"], opt0["state"][0]["exp_avg"])
    assert all(m.s.grad is None for m in adapter.layers.values())
    assert adapter.bank.tracker.running is not None and torch.isfinite(adapter.bank.tracker.running.mean).all()


def test_batch_size_one_runs_and_keeps_s_finite():
    adapter = IMSE(tiny_vit(), IMSEConfig(stats_window=4))
    start = {n: m.s.detach().clone() for n, m in adapter.adapted.items()}
    for _ in range(4):
        logits = adapter(torch.randn(1, 3, 32, 32))
        assert logits.shape == (1, 10)
    assert adapter.bank.tracker.running is not None  # the 4th single image completed a window
    assert all(torch.isfinite(m.s).all() for m in adapter.layers.values())
    assert any(not torch.equal(m.s.detach(), start[n]) for n, m in adapter.adapted.items())


def test_autocast_bf16_keeps_s_and_optimizer_state_float32():
    adapter = IMSE(tiny_vit(), IMSEConfig(stats_window=8))
    start = {n: m.s.detach().clone() for n, m in adapter.adapted.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            logits = adapter(torch.randn(8, 3, 32, 32))
    assert logits.dtype == torch.bfloat16 and adapter.skipped_steps == 0
    for n, m in adapter.adapted.items():
        assert m.s.dtype == torch.float32 and torch.isfinite(m.s).all() and not torch.equal(m.s.detach(), start[n])
    for st in adapter.optimizer.base_optimizer.state.values():
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance() pokes deprecated lazy module attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_repeated_steps_do_not_grow_memory():
    adapter = IMSE(tiny_vit(), IMSEConfig(stats_window=8))
    x = torch.randn(8, 3, 32, 32)
    adapter(x)
    adapter(x)
    n0 = _live_tensors()
    for _ in range(2):
        adapter(x)
    assert _live_tensors() <= n0  # other tests' garbage may be freed meanwhile; growth is the defect
    assert adapter.probe._moments == [] and len(adapter.events) == 0


def test_reset_and_episodic():
    model = tiny_vit()
    adapter = IMSE(model, IMSEConfig(stats_window=8))
    start = {n: m.s.detach().clone() for n, m in adapter.layers.items()}
    x = torch.randn(8, 3, 32, 32)
    first = adapter(x)
    adapter.reset()
    assert all(torch.equal(m.s.detach(), start[n]) for n, m in adapter.layers.items())
    assert adapter.optimizer.state_dict()["state"] == {} and len(adapter.bank.entries) == 1
    assert adapter.steps_taken == 0 and adapter.bank.tracker.running is None
    torch.testing.assert_close(adapter(x), first, rtol=0, atol=0)  # same start, same result
    episodic = IMSE(tiny_vit(), IMSEConfig(episodic=True, stats_window=8))
    a, b = episodic(x), episodic(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_retrieval_can_load_the_entry_optimizer_state():
    adapter = IMSE(tiny_vit(), IMSEConfig(stats_window=8, optimizer_on_retrieval="load"))
    x = torch.randn(8, 3, 32, 32)
    adapter(x)
    codes, opt_state = adapter._snapshot()  # what the bank stores on a shift
    adapter(x)
    retrieval = Retrieval(codes, 1, {1: 0.0}, {1: 1.0}, opt_state)
    adapter.bank.observe = lambda tokens, snapshot: retrieval
    adapter._observe(x)
    assert all(torch.equal(m.s.detach(), codes[n]) for n, m in adapter.layers.items())
    loaded = adapter.optimizer.state_dict()["state"]
    assert loaded[0]["step"].item() == 1 and torch.equal(loaded[0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        adapter(x)


def test_bad_models_and_configs_raise():
    with pytest.raises(ValueError, match="retrieval"):
        IMSEConfig(retrieval="nearest")
    with pytest.raises(ValueError, match="keep_all takes no bound"):
        IMSEConfig(max_entries=4)
    with pytest.raises(ValueError, match="out of range"):
        IMSE(tiny_vit(), IMSEConfig(adapt_blocks=(7,)))
    with pytest.raises(ValueError, match="blocks"), pytest.warns(UserWarning, match="no nn.Linear matched"):
        IMSE(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="IMSEConfig"):
        IMSE(tiny_vit(), config={"lr": 1e-3})


# ------------------------------------------------------------------ a recurring 3-domain stream

def test_recurring_stream_detects_shifts_and_retrieves_own_codes(tmp_path):
    torch.manual_seed(0)
    adapter = IMSE(tiny_vit(), IMSEConfig(stats_window=8, lr=3e-3))
    g = torch.Generator().manual_seed(1)

    def images(d):
        x = torch.randn(8, 3, 32, 32, generator=g)
        return [x, x * 1.8 + 0.6, x * 0.5 - 0.5, x * 1.2 - 1.0][d]

    adapter.source_statistics([images(0), (images(0), torch.zeros(8))])
    seen = {}
    real_step = adapter._step

    def spy(x):  # the code in place when the SAM update starts
        seen[adapter.bank.batch - 1] = ({n: m.s.detach().clone() for n, m in adapter.layers.items()},
                                        len(adapter.optimizer.state_dict()["state"]))
        return real_step(x)

    adapter._step = spy
    order = [1, 1, 2, 2, 3, 3, 1, 1, 2]
    for d in order:
        adapter(images(d))
    shifts = [e.batch for e in adapter.events if e.kind == "shift"]
    assert shifts == [2, 4, 6, 8]
    retrieved = {e.batch: e for e in adapter.events if e.kind == "retrieve"}
    assert retrieved[6].entry == 1 and retrieved[8].entry == 2  # domain 1 → entry 1, domain 2 → entry 2
    for b in (6, 8):
        e = retrieved[b]
        assert e.distances[e.entry] < 0.05 < min(v for k, v in e.distances.items() if k != e.entry)
        codes, opt_entries = seen[b]
        stored = next(x for x in adapter.bank.entries if x.entry_id == e.entry)
        assert opt_entries == 0  # optimizer state reset on retrieval
        for n in codes:
            assert torch.equal(codes[n], stored.codes[n])
    # the bank travels to a fresh adapter on the same pretrained weights
    adapter.save_bank(tmp_path / "bank.safetensors")
    torch.manual_seed(0)
    twin = IMSE(tiny_vit(), IMSEConfig(stats_window=8))
    twin.load_bank(tmp_path / "bank.safetensors")
    assert [e.entry_id for e in twin.bank.entries] == [e.entry_id for e in adapter.bank.entries] == [0, 1, 2, 3, 4]
    for a, b in zip(adapter.bank.entries, twin.bank.entries):
        assert all(torch.equal(a.codes[n], b.codes[n]) for n in a.codes)
