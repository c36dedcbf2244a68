"""MultiStreamIMSE (docs/design.md §8): K streams in one batched step equal K separate IMSE adapters, each
given only its own samples — logits, codes, Adam state, code banks with their events, counters — to
float32 round-off; absent streams stay untouched; per-row Adam equals torch.optim.Adam; K = 1 is IMSE;
bad inputs; state round trip; add_stream / reset_stream."""
import copy
import dataclasses

import pytest
import torch
from helpers import CountingBackend, domain, tiny_vit

from imse_kernels.optim import RowAdam
from imse_kernels.tta import IMSE, AdapterStateError, IMSEConfig, MultiStreamIMSE

CONFIG = dict(stats_window=4, shift_threshold=0.3, lr=3e-3)  # within-domain KL of 4-image windows < 0.3 < across
K = 3
# per batch, per stream: (domain, number of samples); stream 0 stays in domain 1, stream 1 goes 1 → 2 → 1
# (shifts at its batches 2 and 4, the second retrieving entry 1), stream 2 goes 3 → 2 and is absent from batch 2
SCHEDULE = [[(1, 4), (1, 4), (3, 4)], [(1, 4), (1, 3), (3, 4)], [(1, 4), (2, 4), (3, 0)],
            [(1, 3), (2, 4), (2, 5)], [(1, 4), (1, 4), (2, 4)], [(1, 4), (1, 4), (2, 2)]]
NAN_AT = (4, 0)  # batch 4: one image of stream 0 is not finite → only stream 0 skips its step
TOL = dict(logits=1e-4, codes=1e-5, adam=1e-5, bank=1e-5)  # float32 (|logits| reach ~13)
TOL64 = dict.fromkeys(TOL, 1e-9)  # float64 model and images (codes and Adam state stay float32)
pytestmark = pytest.mark.usefixtures("one_thread")


def model(dtype=torch.float32):
    return tiny_vit(dtype=dtype, seed=0)


def mixed_batches(schedule=SCHEDULE, seed=1, dtype=torch.float32):
    """(source batch, [(x, streams)]): each stream's samples in its domain, interleaved by a permutation."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(8, 3, 32, 32, generator=g)
    out = []
    for b, plan in enumerate(schedule):
        xs = [domain(torch.randn(n, 3, 32, 32, generator=g), d) for d, n in plan]
        if b == NAN_AT[0]:
            xs[NAN_AT[1]][1, 0, 3, 3] = float("nan")
        streams = torch.cat([torch.full((n,), k, dtype=torch.long) for k, (_, n) in enumerate(plan)])
        perm = torch.randperm(len(streams), generator=g)
        out.append((torch.cat(xs)[perm].to(dtype), streams[perm]))
    return source.to(dtype), out


def diff(a, b, where="state") -> float:
    """Max abs difference of two nested states (tensors and floats; NaNs must sit at the same places);
    structure, dtypes, shapes and every other value must be equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        a, b = a.detach().double(), b.detach().double()
        assert torch.equal(a.isnan(), b.isnan()), where
        ok = ~a.isnan()
        return float((a[ok] - b[ok]).abs().max()) if ok.any() else 0.0
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if a == b or (a != a and b != b) else abs(a - b)
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: {list(a)} != {list(b)}"
        return max([diff(a[k], b[k], f"{where}.{k}") for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        return max([diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"
    return 0.0


def stream_state(adapter: MultiStreamIMSE, k: int) -> dict:
    return copy.deepcopy({"codes": adapter.stream_codes(k), "adam": adapter.stream_optimizer_state(k),
                          "bank": adapter.banks[k].state_dict(),
                          "counters": (adapter.steps_taken[k], adapter.skipped_steps[k])})


def imse_state(adapter: IMSE) -> dict:
    return copy.deepcopy({"codes": {n: m.s.detach() for n, m in adapter.layers.items()},
                          "adam": adapter.optimizer.state_dict(), "bank": adapter.bank.state_dict(),
                          "counters": (adapter.steps_taken, adapter.skipped_steps)})


def compare(multi: MultiStreamIMSE, separate: list, batches, check_absent=True) -> dict:
    """Run both over `batches`; return the max abs differences per quantity (asserting the structure)."""
    worst = dict.fromkeys(TOL, 0.0)
    for x, streams in batches:
        absent = [k for k in range(len(separate)) if not (streams == k).any()]
        before = {k: stream_state(multi, k) for k in absent}
        logits = multi(x, streams)
        for k, sep in enumerate(separate):
            if (streams == k).any():
                worst["logits"] = max(worst["logits"], diff(logits[streams == k], sep(x[streams == k])))
        if check_absent:
            for k in absent:  # no step, no moment decay, no bank batch, bitwise
                assert diff(stream_state(multi, k), before[k]) == 0.0
    for k, sep in enumerate(separate):
        got, want = stream_state(multi, k), imse_state(sep)
        assert got["counters"] == want["counters"], k
        worst["codes"] = max(worst["codes"], diff(got["codes"], want["codes"]))
        worst["adam"] = max(worst["adam"], diff(got["adam"], want["adam"]))
        worst["bank"] = max(worst["bank"], diff(got["bank"], want["bank"]))
    return worst


@pytest.mark.parametrize("max_group_samples,extra,dtype", [
    (None, {}, torch.float32), (5, {}, torch.float32), (None, {}, torch.float64),
    (None, dict(retrieval="mix", optimizer_on_retrieval="load"), torch.float32)])
def test_three_streams_equal_three_separate_imse_adapters(max_group_samples, extra, dtype):
    """Interleaved samples, a stream absent from a batch, shifts and retrievals in two streams, a
    non-finite image in one stream: per stream, logits, codes, Adam state (step counts included), the
    whole code bank (entries, stored codes and optimizer states, events, tracker) and counters agree.
    Also in groups of whole streams, with mixed retrieval loading the entry's Adam state, and in float64."""
    source, batches = mixed_batches(dtype=dtype)
    cfg = IMSEConfig(**CONFIG, **extra)
    multi = MultiStreamIMSE(model(dtype), K, cfg, max_group_samples=max_group_samples)
    separate = [IMSE(model(dtype), cfg) for _ in range(K)]
    multi.source_statistics([source])
    for sep in separate:
        sep.source_statistics([source])
    worst = compare(multi, separate, batches)
    print(f"\nK={K} vs separate IMSE ({dtype}, max_group_samples={max_group_samples}, {extra}), "
          f"max abs diffs: {worst}")
    for key, tol in (TOL if dtype == torch.float32 else TOL64).items():
        assert worst[key] <= tol, (key, worst[key])
    kinds = [[(e.batch, e.kind, e.entry) for e in ev if e.kind != "source"] for ev in multi.events]
    assert kinds[0] == []
    assert kinds[1] == [(2, "shift", 1), (2, "retrieve", 0), (4, "shift", 2), (4, "retrieve", 1)]
    assert kinds[2] == [(2, "shift", 1), (2, "retrieve", 0)]  # its 3rd batch: it skipped global batch 2
    assert multi.skipped_steps == [1, 0, 0] and multi.steps_taken == [5, 6, 5]
    # a retrieval resets only its stream's Adam (stream 1 then steps at its batches 4 and 5; with "load"
    # it goes on from entry 1's state, stored after 2 steps); stream 0 kept counting
    assert multi.adam.steps == ([5, 4, 3] if extra else [5, 2, 3])


@pytest.mark.parametrize("extra", [dict(steps=2), dict(episodic=True), dict(diversity_weight=0.0),
                                   dict(adapt_blocks=(0, 3))])  # block 3 is adapted and probed
def test_two_streams_other_settings(extra):
    """In float64: in float32 the last case's Adam state differs by ~3e-5, as much as IMSE's own differs
    when its input is perturbed by 1e-7 relative (a stream with no reliable sample, the diversity term
    alone; its one-pass variance cancels), so float64 shows the equivalence itself."""
    _, batches = mixed_batches([[(1, 3), (2, 4)], [(1, 4), (2, 2)]], seed=9, dtype=torch.float64)
    cfg = IMSEConfig(**CONFIG, **extra)
    multi = MultiStreamIMSE(model(torch.float64), 2, cfg)
    separate = [IMSE(model(torch.float64), cfg) for _ in range(2)]
    worst = compare(multi, separate, batches)
    print(f"\nK=2 vs separate IMSE (float64, {extra}), max abs diffs: {worst}")
    for key, tol in TOL64.items():
        assert worst[key] <= tol, (key, worst[key])
    assert multi.steps_taken == [2 * cfg.steps] * 2


def test_non_finite_second_pass_skips_only_that_stream():
    """Stream 1's second-pass loss is made NaN: its ascent is undone and it is not stepped (codes and Adam
    as before, counted as skipped); stream 0 takes the same step as a separate IMSE."""
    _, batches = mixed_batches([[(1, 4), (2, 4)], [(1, 4), (2, 4)]], seed=11)
    cfg = IMSEConfig(**CONFIG)
    multi, sep0 = MultiStreamIMSE(model(), 2, cfg), IMSE(model(), cfg)
    compare(multi, [sep0, IMSE(model(), cfg)], batches[:1])
    before = stream_state(multi, 1)
    real, calls = multi.probe.moments_fn, {"n": 0}

    def nan_for_stream_1_in_second_pass(x, Vh, h=None):
        calls["n"] += 1
        m = real(x, Vh, h=h)
        if calls["n"] > len(multi.probe.layers):
            m.sum = m.sum * torch.tensor([[1.0], [float("nan")]])
        return m

    multi.probe.moments_fn = nan_for_stream_1_in_second_pass
    x, streams = batches[1]
    logits = multi(x, streams)
    assert diff(logits[streams == 0], sep0(x[streams == 0])) <= TOL["logits"]
    assert diff(stream_state(multi, 0), imse_state(sep0)) <= TOL["codes"]
    after = stream_state(multi, 1)
    assert diff(after["codes"], before["codes"]) == 0.0 and diff(after["adam"], before["adam"]) == 0.0
    assert multi.steps_taken == [2, 1] and multi.skipped_steps == [0, 1]
    assert all(m.codes.grad is None and torch.isfinite(m.codes).all() for m in multi.adapted.values())


def test_one_stream_equals_plain_imse():
    g = torch.Generator().manual_seed(3)
    xs = [domain(torch.randn(8, 3, 32, 32, generator=g), d) for d in (1, 1, 2)]
    cfg = IMSEConfig(stats_window=8, shift_threshold=0.3)
    multi, plain = MultiStreamIMSE(model(), 1, cfg), IMSE(model(), cfg)
    worst = compare(multi, [plain], [(x, torch.zeros(8, dtype=torch.long)) for x in xs])
    print(f"\nK=1 vs IMSE, max abs diffs: {worst}")
    for key, tol in TOL.items():
        assert worst[key] <= tol, (key, worst[key])
    assert [e.kind for e in plain.events] == ["shift", "retrieve"] and multi.steps_taken == [3]


def test_row_adam_equals_torch_adam_per_row():
    """Each row of a (K, r) table against torch.optim.Adam on its own (r,) parameter: rows skipped in
    some steps (no moment decay) and one row's optimizer reset; bitwise on the CPU."""
    torch.manual_seed(0)
    k, r = 3, 7
    table = torch.randn(k, r)
    refs = [torch.nn.Parameter(table[i].clone()) for i in range(k)]
    opts = [torch.optim.Adam([p], lr=7e-3, betas=(0.9, 0.999)) for p in refs]
    adam = RowAdam({"t": (k, r)}, "cpu", 7e-3, (0.9, 0.999))
    for rows in ([0, 1, 2], [0, 2], [1], "reset 1", [1, 2], [0, 1, 2]):
        if rows == "reset 1":
            opts[1] = torch.optim.Adam([refs[1]], lr=7e-3, betas=(0.9, 0.999))
            adam.reset(1)
            continue
        g = torch.randn(k, r) * torch.logspace(-9, 1, r)  # tiny to large gradients
        for i in rows:
            refs[i].grad = g[i].clone()
            opts[i].step()
        adam.step({"t": table}, {"t": g[rows]}, rows)
    for i in range(k):
        st = opts[i].state[refs[i]]
        assert torch.equal(table[i], refs[i].detach())
        assert torch.equal(adam.exp_avg["t"][i], st["exp_avg"])
        assert torch.equal(adam.exp_avg_sq["t"][i], st["exp_avg_sq"])
        assert adam.steps[i] == int(st["step"])
    assert adam.steps == [3, 2, 4]


def test_bad_streams_are_refused():
    multi = MultiStreamIMSE(model(), 2, IMSEConfig(stats_window=4))
    x = torch.randn(4, 3, 32, 32)
    ok = torch.tensor([0, 1, 1, 0])
    with pytest.raises(TypeError, match="int64"):
        multi(x, ok.int())
    with pytest.raises(TypeError, match="int64 tensor"):
        multi(x, [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        multi(x, ok[:3])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        multi(x, ok[None])
    with pytest.raises(IndexError, match=r"\[0, 2\).*max 2"):
        multi(x, torch.tensor([0, 2, 1, 0]))
    with pytest.raises(IndexError, match="min -1"):
        multi(x, torch.tensor([0, -1, 1, 0]))
    with pytest.raises(TypeError, match="image batch"):
        multi(x[0], ok)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        multi(x, ok)
    with pytest.raises(IndexError, match="out of range"):
        multi.reset_stream(2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_streams"):
            MultiStreamIMSE(model(), bad)
    with pytest.raises(ValueError, match="max_group_samples"):
        MultiStreamIMSE(model(), 2, max_group_samples=0)
    assert multi.steps_taken == [0, 0] and all(b.batch == 0 for b in multi.banks)  # nothing ran


def _resume_setup():
    source, batches = mixed_batches(SCHEDULE[:4], seed=5)
    a = MultiStreamIMSE(model(), K, IMSEConfig(**CONFIG))
    a.source_statistics([source])
    return a, batches


def _summary(a: MultiStreamIMSE) -> dict:
    return copy.deepcopy({"model": a.model.state_dict(), "extra": a.get_extra_state(),
                          "events": [[dataclasses.asdict(e) for e in ev] for ev in a.events]})


def test_state_dict_round_trip_resumes_bit_for_bit(tmp_path):
    straight, batches = _resume_setup()
    logits = [straight(x, s) for x, s in batches]
    half, _ = _resume_setup()
    for x, s in batches[:2]:
        half(x, s)
    sd = half.state_dict()
    assert [k for k in sd if not k.startswith("model.")] == ["_extra_state"]
    assert sd["model.blocks.0.attn.qkv.codes"].shape == (K, 48)
    torch.save(sd, tmp_path / "m.pt")
    resumed = MultiStreamIMSE(model(), K, IMSEConfig(**CONFIG))  # no source statistics: the state brings them
    resumed.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    rest = [resumed(x, s) for x, s in batches[2:]]
    assert diff(rest, logits[2:]) == 0.0 and diff(_summary(resumed), _summary(straight)) == 0.0
    # the same through a safetensors state file
    half.save_state(tmp_path / "m.safetensors")
    again = MultiStreamIMSE(model(), K, IMSEConfig(**CONFIG))
    again.load_state(tmp_path / "m.safetensors")
    assert diff([again(x, s) for x, s in batches[2:]], logits[2:]) == 0.0
    # mismatches are refused and change nothing
    other = MultiStreamIMSE(model(), 2, IMSEConfig(**CONFIG))
    before = _summary(other)
    with pytest.raises(AdapterStateError, match="3 streams, this adapter 2"):
        other.load_state_dict(sd)
    with pytest.raises(AdapterStateError, match="'MultiStreamIMSE' adapter's, this is IMSE"):
        IMSE(model(), IMSEConfig(**CONFIG)).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["_extra_state"]["optimizer"]["exp_avg"]["blocks.0.attn.qkv"] = torch.zeros(2, 48)
    other.add_stream()
    before = _summary(other)
    with pytest.raises(AdapterStateError, match="exp_avg"):
        other.load_state_dict(bad)
    with pytest.raises(AdapterStateError, match="another config"):
        MultiStreamIMSE(model(), K, IMSEConfig(stats_window=4)).load_state_dict(sd)
    assert diff(_summary(other), before) == 0.0
    other.load_state_dict(sd)
    assert diff(_summary(other), _summary(half)) == 0.0
    # a stream's bank file is an IMSE bank file
    straight.save_bank(tmp_path / "bank1.safetensors", 1)
    plain = IMSE(model(), IMSEConfig(**CONFIG))
    plain.load_bank(tmp_path / "bank1.safetensors")
    other.load_bank(tmp_path / "bank1.safetensors", 0)
    for bank in (plain.bank, other.banks[0]):
        assert diff([(e.entry_id, e.codes) for e in bank.entries],
                    [(e.entry_id, e.codes) for e in straight.banks[1].entries]) == 0.0
    assert len(straight.banks[1].entries) == 2  # source + the domain that ended at its batch 2


def test_add_and_reset_stream():
    cfg = IMSEConfig(**CONFIG)
    multi = MultiStreamIMSE(model(), 2, cfg)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, 32, 32, generator=g)
    multi(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    source = {n: m.s.detach().clone() for n, m in multi.layers.items()}
    assert multi.add_stream() == 2 and multi.num_streams == 3 and len(multi.events) == 3
    assert diff(multi.stream_codes(2), source) == 0.0 and multi.stream_optimizer_state(2)["state"] == {}
    # the new stream behaves as a fresh IMSE on its samples; the old ones go on
    y = torch.randn(6, 3, 32, 32, generator=g)
    streams = torch.tensor([2, 0, 2, 1, 2, 2])
    kept = stream_state(multi, 1)
    fresh = IMSE(model(), cfg)
    worst = diff(multi(y, streams)[streams == 2], fresh(y[streams == 2]))
    assert worst <= TOL["logits"] and diff(stream_state(multi, 2), imse_state(fresh)) <= TOL["codes"]
    assert multi.steps_taken == [2, 2, 1]
    multi.reset_stream(0)
    assert diff(multi.stream_codes(0), source) == 0.0 and multi.stream_optimizer_state(0)["state"] == {}
    assert multi.banks[0].batch == 0 and multi.steps_taken[0] == multi.skipped_steps[0] == 0
    assert multi.stream_optimizer_state(1)["state"][0]["step"] == 2
    assert diff(stream_state(multi, 1)["codes"], kept["codes"]) > 0  # stream 1 adapted in the last batch
    multi.reset()
    assert all(diff(multi.stream_codes(k), source) == 0.0 for k in range(3)) and multi.steps_taken == [0, 0, 0]


def test_compiled_equals_eager_and_recompiles_are_bounded():
    """compile=...: the same logits, codes, Adam state, banks and counters as eager over the mixed stream
    (shifts, retrievals, an absent stream, a skipped step); graphs bounded by the distinct numbers of
    streams present and batch sizes, and a repeated stream compiles nothing more."""
    torch._dynamo.reset()
    source, batches = mixed_batches()
    cfg = IMSEConfig(**CONFIG)
    counter = CountingBackend()
    eager = MultiStreamIMSE(model(), K, cfg)
    compiled = MultiStreamIMSE(model(), K, cfg, compile={"backend": counter})
    for a in (eager, compiled):
        a.source_statistics([source])
    worst = dict.fromkeys(TOL, 0.0)
    for x, streams in batches:
        worst["logits"] = max(worst["logits"], diff(compiled(x, streams), eager(x, streams)))
    for k in range(K):
        got, want = stream_state(compiled, k), stream_state(eager, k)
        assert got["counters"] == want["counters"], k
        for key in ("codes", "adam", "bank"):
            worst[key] = max(worst[key], diff(got[key], want[key]))
    graphs, skipped = counter.graphs, list(compiled.skipped_steps)
    for x, streams in batches:
        compiled(x, streams)
    print(f"\ncompiled MultiStreamIMSE vs eager, max abs diffs: {worst}; graphs {graphs}, then {counter.graphs}")
    for key, tol in TOL.items():
        assert worst[key] <= tol, (key, worst[key])
    assert skipped == eager.skipped_steps == [1, 0, 0]
    assert 1 <= graphs <= 8 and counter.graphs == graphs
    torch._dynamo.reset()
