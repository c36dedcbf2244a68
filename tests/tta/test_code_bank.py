"""Domain statistics, shift detection, retrieval, bounds and files of the code bank."""
import copy
import json
import os

import pytest
import torch
from helpers import TOKEN_CHANNELS, TOKENS_PER_IMAGE, domain_tokens, token_domains
from safetensors.torch import save_file

from imse_kernels.tta import BankFileError, CodeBank, DomainStats, DomainTracker, symmetric_kl
from imse_kernels.tta.domain_stats import image_moments, pooled_stats

C, T = TOKEN_CHANNELS, TOKENS_PER_IMAGE


def official_kl(domain_var, domain_mean, cur_var, cur_mean):
    d1 = (domain_var + (domain_mean - cur_mean) ** 2) / 2. / cur_var - 0.5
    d2 = (cur_var + (domain_mean - cur_mean) ** 2) / 2. / domain_var - 0.5
    return torch.mean(d1 + d2)


def test_symmetric_kl_is_both_kls_averaged_over_channels():
    a = DomainStats(torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.1)
    b = DomainStats(torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.1)
    Na = torch.distributions.Normal(a.mean, a.var.sqrt())
    Nb = torch.distributions.Normal(b.mean, b.var.sqrt())
    expected = (torch.distributions.kl_divergence(Na, Nb) + torch.distributions.kl_divergence(Nb, Na)).mean()
    assert symmetric_kl(a, b) == pytest.approx(float(expected), rel=1e-12)
    assert symmetric_kl(a, b) == pytest.approx(symmetric_kl(b, a), rel=1e-12)
    assert symmetric_kl(a, a) == pytest.approx(0.0, abs=1e-15)


def test_pooled_window_stats_equal_var_mean_over_images_and_tokens():
    x = domain_tokens(token_domains()[0], 5, 0) * 3 + 100  # large mean: the pooling must not lose precision
    stats = pooled_stats(*image_moments(x))
    var, mean = torch.var_mean(x.double(), dim=(0, 1))
    torch.testing.assert_close(stats.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, var, rtol=1e-5, atol=1e-6)


def test_full_batches_follow_the_official_detector():
    doms = token_domains()
    order = [0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1]
    batches = [domain_tokens(doms[d], 8, i) for i, d in enumerate(order)]
    # the official DomainInfo loop, written out
    var = mean = None
    shifts, ended = [], []
    for i, f in enumerate(batches):
        cv, cm = f.var(dim=(0, 1)), f.mean(dim=(0, 1))
        if var is not None and official_kl(var, mean, cv, cm) > 0.05:
            shifts.append(i)
            ended.append(mean)
            var = mean = None
        var, mean = (cv, cm) if var is None else (0.8 * var + 0.2 * cv, 0.8 * mean + 0.2 * cm)
    tracker = DomainTracker(window=8, momentum=0.8, threshold=0.05)
    ours, ours_ended = [], []
    for i, f in enumerate(batches):
        obs = tracker.observe(f)
        if obs.shift:
            ours.append(i)
            ours_ended.append(obs.ended.mean)
    assert ours == shifts == [3, 5, 8, 10]
    for a, b in zip(ours_ended, ended):
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tracker.running.mean.float(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tracker.running.var.float(), var, rtol=1e-5, atol=1e-5)


def test_batch_size_one_uses_a_sliding_window():
    doms = token_domains()
    order = [0] * 24 + [1] * 24 + [2] * 24
    tracker = DomainTracker(window=8, momentum=0.8, threshold=0.05)
    shifts, first_stats = [], None
    for i, d in enumerate(order):
        obs = tracker.observe(domain_tokens(doms[d], 1, 100 + i))
        if i < 7:
            assert obs.stats is None  # the window is not full yet: no decision on 1 image
        elif first_stats is None:
            first_stats = obs.stats
        if obs.shift:
            shifts.append(i)
    assert len(shifts) == 2
    assert 24 <= shifts[0] < 24 + 4 and 48 <= shifts[1] < 48 + 4  # within a few images of the true boundary
    one_image = pooled_stats(*image_moments(domain_tokens(doms[0], 1, 0)))
    pooled = torch.var_mean(torch.cat([domain_tokens(doms[0], 1, 100 + i) for i in range(8)]).double(), dim=(0, 1))
    torch.testing.assert_close(first_stats.var, pooled[0], rtol=1e-5, atol=1e-6)
    assert one_image.mean.shape == (C,)


def test_non_finite_tokens_are_ignored():
    tracker = DomainTracker(window=4)
    tracker.observe(domain_tokens(token_domains()[0], 4, 0))
    before = tracker.running
    bad = domain_tokens(token_domains()[0], 4, 1)
    bad[0, 0, 0] = float("nan")
    obs = tracker.observe(bad)
    assert obs.stats is None and not obs.shift and tracker.running is before


# ------------------------------------------------------------------------- the bank

class FakeModel:
    """Codes that say which domain they were adapted on, as snapshot() would return them."""

    def __init__(self):
        self.domain = None
        self.codes = {"blocks.0.attn.qkv": torch.zeros(6), "blocks.0.mlp.fc1": torch.zeros(4)}

    def adapt_on(self, d):
        self.codes = {k: v + (d + 1) for k, v in self.codes.items()}

    def snapshot(self):
        return ({k: v.clone() for k, v in self.codes.items()},
                {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []})


def run_stream(bank, order, batch=8, model=None):
    model = model or FakeModel()
    doms = token_domains()
    log = []
    for i, d in enumerate(order):
        found = bank.observe(domain_tokens(doms[d], batch, 1000 + i), model.snapshot)
        if found is not None:
            model.codes = found.codes
            log.append((i, found))
        model.adapt_on(d)
    return model, log


def make_bank(**kw):
    bank = CodeBank({"blocks.0.attn.qkv": torch.zeros(6), "blocks.0.mlp.fc1": torch.zeros(4)}, window=8, **kw)
    src = torch.randn(32, T, C) * 0.2
    bank.set_source_stats(pooled_stats(*image_moments(src)))
    return bank


def test_recurring_domains_retrieve_their_own_entry():
    bank = make_bank(retrieval="top1")
    order = [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    _, log = run_stream(bank, order)
    shifts = [(e.batch, e.entry) for e in bank.events if e.kind == "shift"]
    assert [b for b, _ in shifts] == [2, 4, 6, 8, 10]
    retrieved = {i: r.entry for i, r in log}
    # entries 1, 2, 3 hold domains 0, 1, 2; the recurrences retrieve them
    assert retrieved[6] == 1 and retrieved[8] == 2 and retrieved[10] == 3
    stored = {e.entry_id: e for e in bank.entries}
    for _, r in log:
        torch.testing.assert_close(r.codes["blocks.0.attn.qkv"], stored[r.entry].codes["blocks.0.attn.qkv"])
        assert r.distances[r.entry] == min(r.distances.values()) and set(r.distances) >= {0, 1}
    assert len(bank.entries) == 6


def test_mixture_weights_and_codes_follow_the_formula():
    bank = make_bank(retrieval="mix", temperature=2.0)
    order = [0, 0, 1, 1, 2]
    _, log = run_stream(bank, order)
    i, r = log[-1]
    ids = list(r.distances)
    d = torch.tensor([r.distances[k] for k in ids], dtype=torch.float64)
    w = torch.exp(-d / 2.0) / torch.exp(-d / 2.0).sum()
    assert [r.weights[k] for k in ids] == pytest.approx(w.tolist(), rel=1e-12)
    entries = {e.entry_id: e for e in bank.entries}
    s0 = entries[0].codes["blocks.0.mlp.fc1"]
    expected = s0 + sum(w[j] * (entries[k].codes["blocks.0.mlp.fc1"] - s0) for j, k in enumerate(ids))
    torch.testing.assert_close(r.codes["blocks.0.mlp.fc1"], expected.float())


def test_retrieval_none_still_logs_shifts():
    bank = make_bank(retrieval="none")
    _, log = run_stream(bank, [0, 0, 1, 1])
    assert log == [] and [e.kind for e in bank.events] == ["source", "shift"]


def test_drop_oldest_bound():
    bank = make_bank(max_entries=3, policy="drop_oldest")
    run_stream(bank, [0, 0, 1, 1, 2, 2, 0, 0, 1])  # shifts at 2, 4, 6, 8 store entries 1..4
    assert [e.entry_id for e in bank.entries] == [0, 3, 4]
    assert [(e.kind, e.entry) for e in bank.events if e.kind == "drop"] == [("drop", 1), ("drop", 2)]


def test_merge_nearest_bound_moment_matches():
    bank = make_bank(max_entries=4, policy="merge_nearest")
    run_stream(bank, [0, 0, 1, 1, 2, 2, 0, 0, 1])  # entries 1 and 4 both describe domain 0
    merges = [e for e in bank.events if e.kind == "merge"]
    assert len(merges) == 1 and len(bank.entries) == 4
    old_id, new_id = merges[0].merged
    assert (old_id, new_id) == (1, 4)  # both describe domain 0
    merged = next(e for e in bank.entries if e.entry_id == 4)
    assert merged.weight == 2.0
    # moment matching: the mixture of the two Gaussians
    bank2 = make_bank()
    run_stream(bank2, [0, 0, 1, 1, 2, 2, 0, 0, 1])
    e1, e4 = bank2.entries[1].stats, bank2.entries[4].stats
    mean = (e1.mean + e4.mean) / 2
    var = (e1.var + e1.mean ** 2 + e4.var + e4.mean ** 2) / 2 - mean ** 2
    torch.testing.assert_close(merged.stats.mean, mean)
    torch.testing.assert_close(merged.stats.var, var)
    for k, v in bank2.entries[4].codes.items():  # the newer entry's code survives
        assert torch.equal(merged.codes[k], v)


def test_bad_bank_arguments():
    codes = {"a": torch.zeros(2)}
    with pytest.raises(ValueError, match="retrieval"):
        CodeBank(codes, retrieval="best")
    with pytest.raises(ValueError, match="max_entries"):
        CodeBank(codes, max_entries=3)  # keep_all takes no bound
    with pytest.raises(ValueError, match="empty"):
        CodeBank({})


# ------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path):
    bank = make_bank()
    adam_state = torch.optim.Adam([torch.nn.Parameter(torch.zeros(6))], lr=1e-3, betas=(0.9, 0.999))
    adam_state.param_groups[0]["params"][0].grad = torch.ones(6)
    adam_state.step()
    model = FakeModel()
    model.snapshot = lambda: (copy.deepcopy(model.codes), copy.deepcopy(adam_state.state_dict()))
    run_stream(bank, [0, 0, 1, 1], model=model)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    other = make_bank()
    other.load(path)
    assert [e.entry_id for e in other.entries] == [e.entry_id for e in bank.entries]
    for a, b in zip(bank.entries, other.entries):
        assert a.created_at == b.created_at and a.weight == b.weight
        for k in a.codes:
            assert torch.equal(a.codes[k], b.codes[k])
        if a.stats is not None:
            assert torch.equal(a.stats.mean, b.stats.mean) and torch.equal(a.stats.var, b.stats.var)
    sd_a, sd_b = bank.entries[1].optimizer_state, other.entries[1].optimizer_state
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert set(sd_a["state"]) == set(sd_b["state"]) == {0}
    for k, v in sd_a["state"][0].items():
        assert torch.equal(v, sd_b["state"][0][k])
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.zeros(6))])
    fresh.load_state_dict(sd_b)  # a real optimizer accepts the restored state


def _saved_bank(tmp_path):
    bank = make_bank()
    run_stream(bank, [0, 0, 1, 1])
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return bank, path


def _assert_unchanged_after_failed_load(tmp_path, path, match):
    target = make_bank()
    before = [e.entry_id for e in target.entries]
    with pytest.raises(BankFileError, match=match):
        target.load(path)
    assert [e.entry_id for e in target.entries] == before


def test_truncated_file_is_rejected(tmp_path):
    _, path = _saved_bank(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_unchanged_after_failed_load(tmp_path, path, "corrupted or truncated")


def test_corrupted_header_and_garbage_are_rejected(tmp_path):
    _, path = _saved_bank(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12  # inside the JSON header
    path.write_bytes(bytes(data))
    _assert_unchanged_after_failed_load(tmp_path, path, "corrupted or truncated")
    path.write_bytes(os.urandom(64))
    _assert_unchanged_after_failed_load(tmp_path, path, "corrupted or truncated")
    with pytest.raises(FileNotFoundError):
        make_bank().load(tmp_path / "missing.safetensors")


def test_non_bank_and_tampered_metadata_are_rejected(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    _assert_unchanged_after_failed_load(tmp_path, plain, "not a code bank")
    _, path = _saved_bank(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        full_meta = f.metadata()
    meta = json.loads(full_meta["imse_code_bank"])
    tensors = load_file(str(path))
    bad_version = dict(meta, version=99)
    save_file(tensors, str(path), metadata={"imse_code_bank": json.dumps(bad_version)})
    _assert_unchanged_after_failed_load(tmp_path, path, "version 99")
    del tensors["e1.s.blocks.0.mlp.fc1"]
    save_file(tensors, str(path), metadata=full_meta)  # metadata and its digest intact, a tensor gone
    _assert_unchanged_after_failed_load(tmp_path, path, "'e1.s.blocks.0.mlp.fc1' listed in the metadata is missing")
    v1 = {k: v for k, v in meta.items() if k != "tensors"} | {"version": 1}  # no manifest to compare with
    save_file(tensors, str(path), metadata={"imse_code_bank": json.dumps(v1)})
    with pytest.warns(UserWarning, match="unverified"):
        _assert_unchanged_after_failed_load(tmp_path, path, "lacks tensors")


def test_mismatched_model_is_rejected(tmp_path):
    _, path = _saved_bank(tmp_path)
    other = CodeBank({"blocks.0.attn.qkv": torch.zeros(7), "blocks.0.mlp.fc1": torch.zeros(4)}, window=8)
    with pytest.raises(BankFileError, match="does not match this model"):
        other.load(path)
    renamed = CodeBank({"blocks.1.attn.qkv": torch.zeros(6), "blocks.0.mlp.fc1": torch.zeros(4)}, window=8)
    with pytest.raises(BankFileError, match="blocks.1.attn.qkv"):
        renamed.load(path)
    other_weights = CodeBank({"blocks.0.attn.qkv": torch.ones(6), "blocks.0.mlp.fc1": torch.zeros(4)}, window=8)
    with pytest.raises(BankFileError, match="pretrained code"):
        other_weights.load(path)
    with pytest.raises(BankFileError, match="channels"):
        make_bank().load(path, channels=C + 1)


# ------------------------------------------------------------------------- state dicts

def test_state_dict_resumes_the_stream_and_refuses_other_banks(tmp_path):
    """A bank restored from its state_dict (saved weights_only-loadable) mid-stream continues exactly as the
    original: same entries, events, tracker and retrievals; a bank of other settings or layers is refused."""
    order = [0, 0, 1, 1, 2, 0, 0, 1]
    bank = make_bank(max_entries=3, policy="merge_nearest")
    model, _ = run_stream(bank, order[:5])
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    twin = CodeBank({"blocks.0.attn.qkv": torch.zeros(6), "blocks.0.mlp.fc1": torch.zeros(4)}, window=8,
                    max_entries=3, policy="merge_nearest")
    twin.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    doms = token_domains()
    for i, d in enumerate(order[5:], start=5):
        x = domain_tokens(doms[d], 8, 1000 + i)
        a, b = bank.observe(x, model.snapshot), twin.observe(x, model.snapshot)
        assert (a is None) == (b is None) and (a is None or (a.entry == b.entry and a.distances == b.distances))
    assert twin.events == bank.events and any(e.kind == "merge" for e in bank.events)
    assert [(e.entry_id, e.created_at, e.weight) for e in twin.entries] == \
        [(e.entry_id, e.created_at, e.weight) for e in bank.entries]
    for a, b in zip(bank.entries, twin.entries):
        assert all(torch.equal(a.codes[k], b.codes[k]) for k in a.codes)
        assert (a.stats is None) == (b.stats is None)
        assert a.stats is None or (torch.equal(a.stats.mean, b.stats.mean) and torch.equal(a.stats.var, b.stats.var))
    assert torch.equal(twin.tracker.running.mean, bank.tracker.running.mean)
    assert twin.tracker._fresh == bank.tracker._fresh
    state = bank.state_dict()
    other = make_bank()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="policy: 'merge_nearest' in the state, 'keep_all' here"):
        other.load_state_dict(state)
    narrow = CodeBank({"blocks.0.attn.qkv": torch.zeros(5), "blocks.0.mlp.fc1": torch.zeros(4)}, window=8,
                      max_entries=3, policy="merge_nearest")
    with pytest.raises(ValueError, match="does not match this model's spectral layers"):
        narrow.load_state_dict(state)
    assert other.state_dict()["events"] == before["events"] and len(other.entries) == 1
