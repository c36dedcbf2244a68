"""The correlated and mixed settings of imse-eval: stream construction, Dirichlet label runs, per-domain scoring
of mixed batches, the detector's delay and false-positive rate, and the aggregation over seeds."""
import math
import statistics

import numpy as np
import pytest
import torch

from imse_kernels.eval.metrics import shift_count, shift_detection
from imse_kernels.eval.report import aggregate, seeds_table, table
from imse_kernels.eval.runner import MethodResult, run_method, take
from imse_kernels.eval.streams import (
    SCHEDULED,
    SETTINGS,
    build_stream,
    dirichlet_order,
    label_runs,
    segment_batches,
    true_boundaries,
)

CS = ["gaussian_noise", "fog", "contrast"]
N = 200  # images per domain
LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(10), N // 10)).tolist()  # i.i.d. order


def _flat(stream):
    return [p for b in stream.schedule for p in b]


def _stream(setting, seed=0, batch_size=16, gamma=0.1, labels=LABELS):
    return build_stream(setting, CS, 5, domain_size=N, batch_size=batch_size, labels=labels, dirichlet=gamma,
                        seed=seed)


def test_all_settings_listed():
    assert SETTINGS[:4] == ("continual", "reset_each_shift", "gradual", "recurring")
    assert set(SCHEDULED) == {"correlated", "mixed_domains", "mixed_correlated"} <= set(SETTINGS)


@pytest.mark.parametrize("setting", SCHEDULED)
def test_every_image_exactly_once_and_deterministic(setting):
    s = _stream(setting)
    assert [seg.corruption for seg in s.segments] == CS and not s.resets_at_boundaries
    flat = _flat(s)
    assert len(flat) == len(set(flat)) == len(CS) * N
    assert sorted(flat) == [(k, i) for k in range(len(CS)) for i in range(N)]
    assert all(1 <= len(b) <= 16 for b in s.schedule)
    # per-domain counts
    assert [sum(1 for k, _ in flat if k == d) for d in range(len(CS))] == [N] * len(CS)
    # the same seed, the same stream; other seeds, other streams
    assert _stream(setting).schedule == s.schedule and _stream(setting).fingerprint() == s.fingerprint()
    others = {_stream(setting, seed=k).fingerprint() for k in range(1, 5)}
    assert s.fingerprint() not in others and len(others) == 4


def test_correlated_keeps_the_continual_order_and_boundaries():
    s = _stream("correlated")
    segs = [{k for k, _ in b} for b in s.schedule]
    assert all(len(x) == 1 for x in segs), "a batch never straddles a domain boundary"
    order = [next(iter(x)) for x in segs]
    assert order == sorted(order), "the domains one after another, in the corruption order"
    per = segment_batches(s)
    assert per == [math.ceil(N / 16)] * 3
    assert true_boundaries(per, s.segments) == [13, 26]
    assert not s.mixes_domains and s.dirichlet == 0.1


def test_mixed_domains_mix_inside_batches():
    s = _stream("mixed_domains")
    assert s.mixes_domains and s.dirichlet is None
    mixed = [len({k for k, _ in b}) for b in s.schedule]
    assert statistics.fmean(mixed) > 2.5, "16 random images of 3 domains: nearly always all three"
    # uniform shuffle: every domain's images spread over the whole stream
    for d in range(3):
        pos = [i for i, (k, _) in enumerate(_flat(s)) if k == d]
        assert pos[0] < 30 and pos[-1] > 3 * N - 30
    # i.i.d. labels stay i.i.d.
    ys = [LABELS[i] for _, i in _flat(s)]
    assert statistics.fmean(label_runs(ys)) < 1.4


def _lag1(ys):
    return statistics.fmean(float(a == b) for a, b in zip(ys, ys[1:]))


@pytest.mark.parametrize("setting", ["correlated", "mixed_correlated"])
def test_dirichlet_runs_are_correlated(setting):
    iid = statistics.fmean(label_runs(LABELS))
    assert iid < 1.3 and _lag1(LABELS) < 0.2  # 10 balanced classes in random order: ~1.1 and ~0.1
    runs01, runs10 = [], []
    for seed in range(4):
        for gamma, into in ((0.1, runs01), (10.0, runs10)):
            s = _stream(setting, seed=seed, gamma=gamma)
            ys = [LABELS[i] for _, i in _flat(s)]
            into.append(statistics.fmean(label_runs(ys)))
            if gamma == 0.1:
                assert _lag1(ys) > 0.6
    # measured: correlated ~5 (gamma 0.1) vs ~2 (gamma 10), mixed_correlated ~13 vs ~6; i.i.d. 1.1
    assert min(runs01) > 4 * iid, runs01
    assert statistics.fmean(runs01) > 1.5 * statistics.fmean(runs10), (runs01, runs10)
    if setting == "mixed_correlated":  # domains still mixed inside the label runs
        s = _stream(setting)
        assert statistics.fmean(len({k for k, _ in b}) for b in s.schedule) > 2.0


def test_dirichlet_order_is_a_permutation_and_checks_gamma():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 7)
    for gamma in (1e-4, 0.1, 100.0):
        order = dirichlet_order(labels, gamma, rng)
        assert sorted(order.tolist()) == list(range(35))
    with pytest.raises(ValueError, match="dirichlet"):
        dirichlet_order(labels, 0.0, rng)
    with pytest.raises(ValueError, match="labels"):
        build_stream("correlated", CS, 5, domain_size=N, batch_size=16, labels=None)
    with pytest.raises(ValueError, match="domain size"):
        build_stream("mixed_domains", CS, 5, domain_size=0)


# ------------------------------------------------------------------ per-domain scoring of mixed batches


class CodedDomain:
    """N images of one domain; image i of domain d carries the code 1000 d + i in every pixel; label i % 10."""

    def __init__(self, d: int, n: int = N, with_get: bool = True):
        self.d, self.n = d, n
        if with_get:
            self.get = self._get

    def __len__(self):
        return self.n

    def _item(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = (1000 * self.d + idx).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
        return x, idx % 10

    def _get(self, indices):
        return self._item(list(indices))

    def batches(self, batch_size, start=0, count=-1):
        n = self.n if count < 0 else count
        idx = [(start + k) % self.n for k in range(n)]
        for i in range(0, n, batch_size):
            yield self._item(idx[i:i + batch_size])


def _right(d, i):
    """Which images the fake adapter gets right: a different, known set per domain."""
    return (d == 0 and i % 3 == 0) or (d == 1 and i < 50) or (d == 2 and False)


class OracleOnKnownImages(torch.nn.Module):
    """Decodes each image's (domain, index) from its pixels; right exactly where `_right` says."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        code = x[:, 0, 0, 0].long()
        d, i = code // 1000, code % 1000
        self.calls.append(len(set(d.tolist())))
        y = i % 10
        pred = torch.where(torch.tensor([_right(a, b) for a, b in zip(d.tolist(), i.tolist())]), y, (y + 1) % 10)
        return torch.nn.functional.one_hot(pred, 10).float()

    def reset(self):
        pass


@pytest.mark.parametrize("setting", SCHEDULED)
@pytest.mark.parametrize("with_get", [True, False])
def test_mixed_batches_are_scored_per_domain(setting, with_get):
    s = _stream(setting, batch_size=32, labels=[i % 10 for i in range(N)])
    doms = {c: CodedDomain(k, with_get=with_get) for k, c in enumerate(CS)}
    adapter = OracleOnKnownImages()
    r = run_method("oracle", adapter, s, lambda seg: doms[seg.corruption], 32, torch.device("cpu"),
                   show_progress=False, config={"class": "fake"})
    want = [sum(_right(d, i) for i in range(N)) for d in range(3)]
    assert want == [67, 50, 0]
    assert r.correct == want and r.total == [N] * 3
    assert r.accuracy == [w / N for w in want]
    assert r.stream_batches == len(s.schedule) == len(adapter.calls)
    assert r.batches == segment_batches(s) and r.config == {"class": "fake"}
    if setting == "correlated":
        assert max(adapter.calls) == 1
    else:
        assert max(adapter.calls) > 1, "batches do mix domains"
    assert r.shift_batches is None  # no `events`: no detector


def test_take_falls_back_to_one_image_batches():
    d = CodedDomain(2, with_get=False)
    x, y = take(d, [5, 0, 199])
    assert x[:, 0, 0, 0].tolist() == [2005, 2000, 2199] and y.tolist() == [5, 0, 9]


# ------------------------------------------------------------------ the detector on hand-made cases


def test_detection_delay_and_false_positives():
    det = shift_detection([10, 12, 21, 25, 40], [10, 20, 30], tolerance=3, n_batches=50)
    assert det["matched"] == [(10, 10), (20, 21)]
    assert det["precision"] == pytest.approx(2 / 5) and det["recall"] == pytest.approx(2 / 3)
    assert det["delays_batches"] == [0, 1]
    assert det["mean_delay_batches"] == 0.5 and det["median_delay_batches"] == 0.5
    assert det["first_detection_delays"] == [0, 1, 10], "late detections show in the first-detection delays"
    assert det["false_alarms"] == 3 and det["false_positives_per_100_batches"] == pytest.approx(6.0)
    assert det["shifts_per_100_batches"] == pytest.approx(10.0) and det["n_batches"] == 50

    late = shift_detection([13, 14], [10], tolerance=2, n_batches=200)
    assert late["matched"] == [] and late["mean_delay_batches"] is None and late["median_delay_batches"] is None
    assert late["first_detection_delays"] == [3] and late["false_positives_per_100_batches"] == pytest.approx(1.0)

    odd = shift_detection([5, 16, 29], [4, 14, 24], tolerance=4, n_batches=40)
    assert odd["delays_batches"] == [1, 2] and odd["median_delay_batches"] == 1.5
    assert odd["false_positives_per_100_batches"] == pytest.approx(2.5)
    assert shift_detection([3], [3])["false_positives_per_100_batches"] is None  # no n_batches: unknown

    none = shift_count([4, 4, 9], 20)
    assert none["detected"] == [4, 9] and none["shifts_per_100_batches"] == pytest.approx(10.0)
    assert none["precision"] is None and none["false_positives_per_100_batches"] is None


def _result(name, correct, total=(10, 10), shifts=None, seconds=1.0):
    return MethodResult(name, list(correct), list(total), [1, 1], seconds, None, 0.0, "process_peak_rss",
                        shifts)


def test_seeds_aggregation_and_tables():
    stream = build_stream("continual", CS[:2], 5)
    runs = []
    for seed, (a, b) in zip((0, 1, 2), ((5, 7), (6, 6), (9, 9))):
        rs = [_result("source", (5, 5)), _result("imse", (a, b), shifts=[1])]
        det = {"source": None, "imse": shift_detection([1], [1], 1, 2)}
        runs.append((seed, rs, det))
    agg = aggregate(runs)
    m = agg["imse"]["mean_accuracy"]
    per = [0.6, 0.6, 0.9]
    assert m["per_seed"] == pytest.approx(per) and agg["imse"]["seeds"] == [0, 1, 2]
    assert m["mean"] == pytest.approx(statistics.fmean(per)) and m["std"] == pytest.approx(statistics.stdev(per))
    assert (m["min"], m["max"]) == pytest.approx((0.6, 0.9))
    assert agg["imse"]["accuracy_per_segment"]["mean"] == pytest.approx([20 / 30, 22 / 30])
    assert agg["source"]["mean_accuracy"]["std"] == 0 and agg["source"]["shift_detection"] is None
    assert agg["imse"]["shift_detection"]["recall"]["mean"] == 1.0
    text = seeds_table(stream, agg)
    assert "70.0 ± 17.3" in text and "60.0–90.0" in text and "mean of 3 seeds" in text
    one = table(stream, runs[0][1], runs[0][2])
    assert "detection delay mean (batches)" in one and "false positives / 100 batches" in one
