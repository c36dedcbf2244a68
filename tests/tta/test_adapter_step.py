"""The IMSE step without host syncs, masked skipping and the optional compiled forward + loss
(docs/design.md §6): compiled equals eager, bounded recompiles, bitwise skips, no `.item()`/`bool()`."""
import copy

import pytest
import torch
from helpers import CountingBackend, tiny_vit

from imse_kernels.tta import IMSE, IMSEConfig, Tent

STATS = {}  # figures the tests print (max abs diffs, graph counts), for the report
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def adam_state(adapter):
    return {i: {k: v.clone() for k, v in st.items()} for i, st in adapter.optimizer.state_dict()["state"].items()}


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare(eager, compiled, sizes, tol, label):
    """Run both adapters on the same batches; assert and record the max abs differences."""
    g = torch.Generator().manual_seed(3)
    worst = {"logits": 0.0, "s": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for b in sizes:
        x = torch.randn(b, 3, 32, 32, generator=g)
        y_e, y_c = eager(x), compiled(x)
        worst["logits"] = max(worst["logits"], max_diff(y_e, y_c))
        torch.testing.assert_close(y_c, y_e, rtol=tol, atol=tol)
    for n in eager.layers:
        worst["s"] = max(worst["s"], max_diff(eager.layers[n].s.detach(), compiled.layers[n].s.detach()))
    se, sc = adam_state(eager), adam_state(compiled)
    assert se.keys() == sc.keys() and se
    for i in se:
        assert torch.equal(se[i]["step"], sc[i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            worst[k] = max(worst[k], max_diff(se[i][k], sc[i][k]))
    assert worst["s"] <= tol and worst["exp_avg"] <= tol and worst["exp_avg_sq"] <= tol, worst
    assert eager.steps_taken == compiled.steps_taken == len(sizes) and compiled.skipped_steps == 0
    STATS[label] = worst
    print(f"\n{label}: max abs diffs {worst}")
    return worst


def pair(compile_option, cfg=None):
    model = tiny_vit(spectral=True)
    cfg = cfg or IMSEConfig(stats_window=8)
    return IMSE(copy.deepcopy(model), cfg), IMSE(model, cfg, compile=compile_option)


def test_compiled_aot_eager_equals_eager_and_recompiles_are_bounded():
    """Equal to eager; one graph for both SAM passes. Recompiles come only from the route planner
    (docs/design.md §2: F or R chosen from N = batch × tokens, so a small batch may cross a threshold),
    never from the batch size as such: revisiting sizes compiles nothing more."""
    backend = CountingBackend("aot_eager")
    eager, compiled = pair({"backend": backend, "fullgraph": True})  # fullgraph: no graph break anywhere
    sizes = [8, 8, 8, 5, 8, 3]  # partial batches in between and at the end
    compare(eager, compiled, sizes, 1e-5, "aot_eager")
    first = backend.graphs
    for b in [8, 5, 3, 8, 6, 7, 4]:  # same routes as sizes already seen (thresholds of this model: 4 < B < 5, B < 3)
        compiled(torch.randn(b, 3, 32, 32))
    again = backend.graphs
    compiled(torch.randn(1, 3, 32, 32))  # batch 1: dynamo specialises sizes 0 and 1
    STATS["graphs"] = {"8,8,8,5,8,3": first, "then 8,5,3,8,6,7,4": again, "then 1": backend.graphs}
    print(f"\ngraphs compiled: {STATS['graphs']}")
    assert first == 3  # B = 8 (dynamic), then 5 and 3 cross a route threshold of the tiny model
    assert again == first  # every further batch reuses a graph
    assert backend.graphs <= first + 1


def test_compiled_inductor_equals_eager():
    """The default backend (inductor, C++ codegen on the CPU)."""
    eager, compiled = pair(True)
    compare(eager, compiled, [8, 8, 5], 1e-4, "inductor")


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_nan_batch_leaves_s_and_adam_state_bitwise_unchanged(mode):
    adapter = IMSE(tiny_vit(spectral=True), IMSEConfig(stats_window=8),
                   compile=None if mode == "eager" else "aot_eager")
    adapter(torch.randn(8, 3, 32, 32))
    s0 = {n: m.s.detach().clone() for n, m in adapter.layers.items()}
    opt0 = adam_state(adapter)
    bad = torch.randn(8, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    adapter(bad)
    assert adapter.skipped_steps == 1 and adapter.steps_taken == 1
    assert isinstance(adapter.skipped_steps, int) and isinstance(adapter.steps_taken, int)
    for n, m in adapter.layers.items():
        assert torch.equal(m.s.detach(), s0[n]), n
        assert m.s.grad is None
    opt1 = adam_state(adapter)
    assert opt1.keys() == opt0.keys()
    for i in opt0:
        for k in opt0[i]:
            assert torch.equal(opt1[i][k], opt0[i][k]), (i, k)
    adapter(torch.randn(8, 3, 32, 32))  # and the stream goes on
    assert adapter.steps_taken == 2 and adapter.skipped_steps == 1
    assert int(adapter.optimizer.state_dict()["state"][0]["step"]) == 2


def test_a_skipped_first_step_then_a_step_equals_one_plain_step():
    """A skipped step at the start changes nothing but the counter: the next step is Adam's first."""
    model = tiny_vit(spectral=True)
    plain, skipped = IMSE(copy.deepcopy(model), IMSEConfig(stats_window=8)), IMSE(model, IMSEConfig(stats_window=8))
    bad = torch.full((8, 3, 32, 32), float("nan"))
    skipped(bad)
    assert skipped.skipped_steps == 1 and skipped.steps_taken == 0
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(skipped(x), plain(x), rtol=0, atol=0)
    for n in plain.layers:
        assert torch.equal(plain.layers[n].s, skipped.layers[n].s), n


class SyncCounter:
    """Counts Tensor.item / __bool__ / __int__ / __float__ / __index__ / tolist calls while on."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")

    def __init__(self, monkeypatch):
        self.on, self.calls = False, []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(t, *args, **kwargs):
            if self.on:
                self.calls.append(name)
            return real(t, *args, **kwargs)
        return counted


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_the_step_reads_nothing_back_from_the_device(mode, monkeypatch):
    adapter = IMSE(tiny_vit(spectral=True), IMSEConfig(stats_window=8),
                   compile=None if mode == "eager" else "aot_eager")
    x = torch.randn(8, 3, 32, 32)
    adapter(x)  # warm-up (and the compile)
    counter = SyncCounter(monkeypatch)
    counter.on = True
    adapter._step(x)  # steps 2-6 of docs/design.md §6: the SAM update
    step_calls = list(counter.calls)
    counter.calls.clear()
    adapter._observe(x)  # step 1: the code bank (its decision is the documented sync)
    bank_calls = list(counter.calls)
    counter.on = False
    print(f"\n{mode}: host reads in the SAM update {step_calls}, in the code bank's observe {bank_calls}")
    assert step_calls == []
    assert adapter.steps_taken == 2
    if mode == "eager":  # also no sync from C++: no scalar read-back, no data-dependent output shape
        with OpRecorder() as ops:
            adapter._step(x)
        bad = sorted(ops.names & OpRecorder.SYNCING)
        assert not bad, bad
        assert "aten.where.self" in ops.names  # the masked update did run under the recorder


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that run; SYNCING lists those that read the device back on a GPU."""

    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.is_nonzero.default", "aten.equal.default", "aten.allclose.default", "aten.item.default",
               "aten.index.Tensor", "aten.unique_consecutive.default", "aten._unique2.default"}

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_step_makes_no_cuda_sync():
    adapter = IMSE(tiny_vit(spectral=True).cuda(), IMSEConfig(stats_window=8))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    adapter(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        adapter._step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert adapter.steps_taken == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_step_equals_eager_and_keeps_the_first_logits():
    """compile={"mode": "reduce-overhead"}: CUDA graphs replayed for both SAM passes; s updated in place."""
    model = tiny_vit(spectral=True).cuda()
    eager = IMSE(copy.deepcopy(model), IMSEConfig(stats_window=8))
    graphs = IMSE(model, IMSEConfig(stats_window=8), compile={"mode": "reduce-overhead"})
    for _ in range(4):
        x = torch.randn(8, 3, 32, 32, device="cuda")
        out_e, out_g = eager(x), graphs(x)
        torch.testing.assert_close(out_g, out_e, rtol=1e-3, atol=1e-3)
    for n, m in eager.layers.items():
        torch.testing.assert_close(graphs.layers[n].s, m.s, rtol=0, atol=1e-5)
    assert graphs.steps_taken == 4


def test_tent_compiled_equals_eager():
    model = tiny_vit(depth=2, head_scale=None)
    eager, compiled = Tent(copy.deepcopy(model), lr=1e-3), Tent(model, lr=1e-3, compile="aot_eager")
    for b in (8, 8, 5):
        x = torch.randn(b, 3, 32, 32)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for p, q in zip(eager.params, compiled.params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert compiled.steps_taken == 3


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile"):
        IMSE(tiny_vit(spectral=True), compile=3)


def test_masked_adam_is_torch_adam_bitwise_and_a_false_flag_changes_nothing():
    """SAM's foreach masked Adam against torch.optim.Adam (single-tensor CPU path), bitwise."""
    from imse_kernels.optim import SAM

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(r)) for r in (48, 144, 192, 7)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    sam, ref = SAM(ps, torch.optim.Adam, lr=7e-3), torch.optim.Adam(qs, lr=7e-3)
    for t in range(6):
        gs = [torch.randn_like(p) * torch.logspace(-9, 1, p.numel()) for p in ps]
        ok = t != 2
        if not ok:
            gs[1][3] = float("nan")
            before = [p.detach().clone() for p in ps], copy.deepcopy(sam.base_optimizer.state_dict())
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        sam._masked_adam_step(torch.tensor(ok))
        if ok:
            ref.step()
        else:
            assert all(torch.equal(p, b) for p, b in zip(ps, before[0]))
            after = sam.base_optimizer.state_dict()["state"]
            assert all(torch.equal(after[i][k], before[1]["state"][i][k]) for i in after for k in after[i])
        for p, q in zip(ps, qs):
            st, sr = sam.base_optimizer.state[p], ref.state[q]
            assert torch.equal(p, q) and torch.equal(st["step"], sr["step"])
            assert torch.equal(st["exp_avg"], sr["exp_avg"]) and torch.equal(st["exp_avg_sq"], sr["exp_avg_sq"])


def test_eval_cli_compile_flag_reaches_the_adapters():
    from imse_kernels.eval.__main__ import build_parser
    from imse_kernels.eval.methods import MethodOptions, build_method

    assert build_parser().parse_args(["--compile"]).compile is True
    assert build_parser().parse_args([]).compile is False
    model = tiny_vit(head_scale=None)
    for name in ("tent", "imse", "imse-mix", "imse-nodiv"):
        assert build_method(name, model, MethodOptions(compile="aot_eager"))._compiled is not None, name
        assert build_method(name, model, MethodOptions())._compiled is None, name
