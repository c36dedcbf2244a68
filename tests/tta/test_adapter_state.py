"""Adapters are nn.Modules whose state_dict is the whole adaptation state: a stream stopped, saved, and
resumed in a fresh process gives bit-identical results; mismatched states are refused, changing nothing."""
import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if __name__ == "__main__":  # the child process of the resume test runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import domain, tiny_vit  # noqa: E402

from imse_kernels.tta import IMSE, AdapterStateError, IMSEConfig, Source, Tent  # noqa: E402

# One intra-op thread here and in the child: the same reduction order, so bitwise-equal results.
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(stats_window=8, lr=3e-3)
DOMAINS = (1, 1, 2, 2, 1, 1)  # shifts at batches 2 (first half) and 4 (after the resume), each with a retrieval
HALF = 3


def stream(seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for d in (0,) + DOMAINS:  # the first batch is the clean source batch
        xs.append(domain(torch.randn(8, 3, 32, 32, generator=g), d))
    return xs[0], xs[1:]


def fresh(kind, source=None):
    """The adapter on a fresh model with the seed-0 weights; IMSE records `source` statistics when given."""
    torch.manual_seed(0)
    if kind == "tent":
        return Tent(tiny_vit(), optim="adam", lr=1e-3)
    adapter = IMSE(tiny_vit(), IMSEConfig(**CONFIG))
    if source is not None:
        adapter.source_statistics([source])
    return adapter


def summary(adapter):
    """What must agree after the stream: model state (the codes s), optimizer, counters, the whole bank."""
    out = {"model": adapter.model.state_dict(), "optimizer": adapter.optimizer.state_dict(),
           "counters": {"steps_taken": adapter.steps_taken, "skipped_steps": adapter.skipped_steps}}
    if isinstance(adapter, IMSE):
        out["bank"] = adapter.bank.state_dict()
        out["events"] = [dataclasses.asdict(e) for e in adapter.events]
    return copy.deepcopy(out)


def max_diff(a, b, where="state") -> float:
    """Max abs difference over every tensor of two nested states, which must have the same structure,
    dtypes, shapes and non-tensor values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        return max([max_diff(a[k], b[k], f"{where}.{k}") for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        return max([max_diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"
    return 0.0


def _child(folder: Path) -> None:
    """Fresh process: fresh adapters on fresh models, states loaded weights_only, the second half of the stream."""
    torch.set_num_threads(1)
    _, xs = stream()
    out = {}
    for kind in ("imse", "tent"):
        adapter = fresh(kind)  # no source statistics: the state brings them
        adapter.load_state_dict(torch.load(folder / f"{kind}.pt", weights_only=True))
        logits = [adapter(x) for x in xs[HALF:]]
        out[kind] = dict(summary(adapter), logits=logits)
    torch.save(out, folder / "out.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per adapter kind: the straight run over all batches and the run resumed in a fresh process."""
    folder = tmp_path_factory.mktemp("resume")
    source, xs = stream()
    straight, resumed = {}, {}
    for kind in ("imse", "tent"):
        a = fresh(kind, source)
        logits = [a(x) for x in xs]
        straight[kind] = dict(summary(a), logits=logits)
        b = fresh(kind, source)
        resumed[kind] = {"logits": [b(x) for x in xs[:HALF]]}
        torch.save(b.state_dict(), folder / f"{kind}.pt")
    proc = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(folder / "out.pt", weights_only=True)
    for kind in resumed:
        resumed[kind] = dict(child[kind], logits=resumed[kind]["logits"] + child[kind]["logits"])
    return straight, resumed


@pytest.mark.parametrize("kind", ["imse", "tent"])
def test_resume_in_a_fresh_process_equals_the_straight_run(runs, kind):
    """6 batches straight == 3 batches, state_dict → file → fresh process, fresh adapter, load, 3 batches:
    logits of every batch, final model state (s), Adam state and step counts, counters and (IMSE) the
    whole code bank with its events, bit for bit."""
    straight, resumed = runs[0][kind], runs[1][kind]
    assert set(straight) == set(resumed)
    assert max_diff(straight, resumed) == 0.0
    if kind == "imse":
        shifts = [e["batch"] for e in straight["events"] if e["kind"] == "shift"]
        retrieved = [e["batch"] for e in straight["events"] if e["kind"] == "retrieve"]
        assert shifts == [2, 4] and 4 in retrieved  # the bank works on both sides of the resume
        assert straight["counters"]["steps_taken"] == len(DOMAINS)
        assert [e["batch"] for e in resumed["events"]][0] == -1  # the source entry's descriptor travelled
    opt = straight["optimizer"]["state"]  # IMSE resets Adam on the retrieval at batch 4, then steps at 4 and 5
    assert opt and all(int(st["step"]) == (2 if kind == "imse" else len(DOMAINS)) for st in opt.values())


def test_safetensors_state_file_resumes_the_same(runs, tmp_path):
    source, xs = stream()
    a = fresh("imse", source)
    for x in xs[:HALF]:
        a(x)
    a.save_state(tmp_path / "imse.safetensors")
    b = fresh("imse")
    b.load_state(tmp_path / "imse.safetensors")
    logits = [b(x) for x in xs[HALF:]]
    straight = runs[0]["imse"]
    assert max_diff(dict(summary(b), logits=logits), dict(straight, logits=straight["logits"][HALF:])) == 0.0
    t = fresh("tent")
    for x in xs[:HALF]:
        t(x)
    t.save_state(tmp_path / "tent.safetensors")
    u = fresh("tent")
    u.load_state(tmp_path / "tent.safetensors")
    assert max_diff(summary(u), summary(t)) == 0.0
    # a damaged file is refused and the adapter keeps its state
    data = bytearray((tmp_path / "imse.safetensors").read_bytes())
    data[-5] ^= 0x01
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    before = summary(b)
    with pytest.raises(AdapterStateError, match="damaged"):
        b.load_state(tmp_path / "bad.safetensors")
    assert max_diff(summary(b), before) == 0.0


def test_state_is_plain_and_does_not_alias_the_adapter(tmp_path):
    _, xs = stream()
    a = fresh("imse")
    a(xs[0])
    sd = a.state_dict()
    assert [k for k in sd if not k.startswith("model.")] == ["_extra_state"]
    extra = sd["_extra_state"]
    assert set(extra) == {"format", "version", "adapter", "config", "layers", "adapted", "counters", "optimizer",
                          "bank"}
    torch.save(sd, tmp_path / "s.pt")
    torch.load(tmp_path / "s.pt", weights_only=True)  # no pickled objects
    exp_avg = extra["optimizer"]["state"][0]["exp_avg"].clone()
    a(xs[1])
    assert torch.equal(extra["optimizer"]["state"][0]["exp_avg"], exp_avg)  # a copy, not the live buffer


def test_mismatched_states_are_refused_and_change_nothing():
    _, xs = stream()
    a = fresh("imse")
    a(xs[0])
    sd = a.state_dict()
    b = fresh("imse")
    b(xs[1])
    before = summary(b)
    wide = IMSE(tiny_vit(seed=0, head_scale=None, embed_dim=60), IMSEConfig(**CONFIG))
    with pytest.raises(AdapterStateError, match=r"different model: .*shape \[1, 1, 48\].*\[1, 1, 60\]"):
        wide.load_state_dict(sd)
    heads = IMSE(tiny_vit(seed=0, head_scale=None, num_classes=7), IMSEConfig(**CONFIG))
    with pytest.raises(AdapterStateError, match=r"model\.head\.weight has shape \[10, 48\]"):
        heads.load_state_dict(sd)
    torch.manual_seed(0)
    other = IMSE(tiny_vit(), IMSEConfig(stats_window=8, lr=1e-3))
    with pytest.raises(AdapterStateError, match=r"another config: lr: 0\.003 in the state, 0\.001 here"):
        other.load_state_dict(sd)
    with pytest.raises(AdapterStateError, match="'IMSE' adapter's, this is Tent"):
        fresh("tent").load_state_dict(sd)
    with pytest.raises(AdapterStateError, match="plain model state_dict"):
        b.load_state_dict(a.model.state_dict(prefix="model."))
    bad = copy.deepcopy(sd)
    bad["_extra_state"]["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(AdapterStateError, match="exp_avg"):
        b.load_state_dict(bad)
    with pytest.raises(AdapterStateError, match="assign=True"):
        b.load_state_dict(sd, assign=True)
    assert max_diff(summary(b), before) == 0.0  # every refusal left b as it was
    b.load_state_dict(sd)
    assert max_diff(summary(b), summary(a)) == 0.0


def test_wrapping_is_an_nn_module_and_changes_nothing_trained():
    model = tiny_vit()
    adapter = IMSE(model)
    assert isinstance(adapter, nn.Module) and adapter.model is model
    assert dict(adapter.named_children()) == {"model": model}
    trained = [n for n, p in adapter.named_parameters() if p.requires_grad]
    assert trained == [f"model.{n}.s" for n in adapter.adapted]
    assert [id(p) for g in adapter.optimizer.param_groups for p in g["params"]] == \
        [id(m.s) for m in adapter.adapted.values()]
    tent = Tent(tiny_vit())
    assert [n for n, p in tent.named_parameters() if p.requires_grad] == [f"model.{n}" for n in tent.param_names]
    _, xs = stream()
    adapter(xs[0])
    twin = copy.deepcopy(adapter)  # a module copy carries the optimizer (SAM with its Adam) and the bank
    torch.testing.assert_close(twin(xs[1]), adapter(xs[1]), rtol=0, atol=0)
    assert max_diff(summary(twin), summary(adapter)) == 0.0


def test_train_and_eval_set_only_the_flag_and_adaptation_goes_on():
    _, xs = stream()
    for kind in ("imse", "tent"):
        a, b = fresh(kind), fresh(kind)
        assert a.eval() is a and not a.training and a.model.training  # the model stays in train mode
        for x in xs[:2]:
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        assert a.steps_taken == b.steps_taken == 2
        a.train()
        assert a.training and a.model.training
    src = Source(tiny_vit())
    src.train()
    assert src.training and not src.model.training  # Source keeps the model in eval mode
    with pytest.raises(ValueError, match="boolean"):
        src.train("yes")


def test_source_state_round_trips(tmp_path):
    torch.manual_seed(0)
    src = Source(tiny_vit())
    src.save_state(tmp_path / "src.safetensors")
    torch.manual_seed(1)
    other = Source(tiny_vit())
    other.load_state(tmp_path / "src.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x), src(x), rtol=0, atol=0)
    with pytest.raises(AdapterStateError, match="'Source' adapter's, this is IMSE"):
        fresh("imse").load_state(tmp_path / "src.safetensors")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
