"""Data-parallel IMSE over gloo, 2 and 3 processes spawned here (docs/design.md §9): equal to one process on
the concatenated batch; streams sharded across ranks; clear errors for a dead, absent or mismatched rank."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).resolve().parents[1] / "dp_worker.py"
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def launch(tmp_path, world, *flags, timeout=20.0, ranks=None):
    """Run `world` ranks (world 0: one process, no group); returns their results by rank."""
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = range(max(world, 1)) if ranks is None else ranks
    procs = {q: subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"rank{q}.pt"), str(q), str(world),
                                  init, "--timeout", str(timeout), *flags])
             for q in ranks}
    for p in procs.values():
        p.wait(timeout=timeout * 6 + 120)
    out = {}
    for q in procs:
        f = tmp_path / f"rank{q}.pt"
        if f.exists():
            out[q] = torch.load(f, weights_only=False)
    return out, {q: p.returncode for q, p in procs.items()}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    res, _ = launch(tmp_path_factory.mktemp("single"), 0)
    assert "error" not in res[0], res[0].get("error")
    return res[0]


@pytest.fixture(scope="module")
def single_streams(tmp_path_factory):
    res, _ = launch(tmp_path_factory.mktemp("single_streams"), 0, "--streams")
    assert "error" not in res[0], res[0].get("error")
    return res[0]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, single, world):
    res, _ = launch(tmp_path, world)
    assert sorted(res) == list(range(world))
    for q in range(world):
        assert "error" not in res[q], res[q].get("error")
    kinds = [k for _, k, _, _ in single["events"]]
    assert kinds.count("shift") >= 2 and "retrieve" in kinds  # the stream exercises the bank
    for i, expected in enumerate(single["logits"]):
        got = torch.cat([res[q]["logits"][i] for q in range(world)])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for q in range(world):
        # every rank holds the same s (bitwise: identical all-reduced gradients) and the same bank log
        for n, s in res[q]["s"].items():
            assert torch.equal(s, res[0]["s"][n]), (q, n)
            torch.testing.assert_close(s, single["s"][n], rtol=0, atol=1e-5)
        assert [(b, k, e) for b, k, e, _ in res[q]["events"]] == [(b, k, e) for b, k, e, _ in single["events"]]
        for (_, _, _, kl), (_, _, _, kl1) in zip(res[q]["events"], single["events"]):
            assert (kl is None) == (kl1 is None) and (kl is None or abs(kl - kl1) <= 1e-9 * max(1.0, kl1))
        assert res[q]["steps_taken"] == single["steps_taken"]
    # communication per step: two all-reduces of the statistics, two of the gradients, one gather of moments
    calls, nbytes = res[0]["calls_first_step"], res[0]["bytes_first_step"]
    assert calls == {"domain moments": 1, "step statistics": 2, "gradients of s": 2}
    n_s = sum(s.numel() for n, s in single["s"].items() if n.startswith(("blocks.0.",)))  # depth 4: block 0 adapted
    assert nbytes["gradients of s"] == 2 * 4 * n_s


@pytest.mark.parametrize("world", [2, 3])
def test_streams_sharded_across_ranks_equal_one_process(tmp_path, single_streams, world):
    res, _ = launch(tmp_path, world, "--streams")
    owned = []
    for q in range(world):
        assert "error" not in res[q], res[q].get("error")
        owned += res[q]["owned"]
        assert res[q]["owned"] == [k for k in range(4) if k % world == q]  # round-robin
    assert sorted(owned) == [0, 1, 2, 3]
    for i, (_idx1, logits1) in enumerate(single_streams["logits"]):
        full = torch.empty_like(logits1)
        for q in range(world):
            idx, logits = res[q]["logits"][i]
            full[idx] = logits
        torch.testing.assert_close(full, logits1, rtol=1e-4, atol=1e-4)
    for q in range(world):
        for k in res[q]["owned"]:
            assert res[q]["events"][k] == single_streams["events"][k]
            for n, c in res[q]["codes"][k].items():
                # 12 Adam steps of lr 7e-3 on float32 round-off of other GEMM shapes: within 2% of one step
                torch.testing.assert_close(c, single_streams["codes"][k][n], rtol=0, atol=1.5e-4)


@pytest.mark.parametrize("fault, field", [("config", "IMSE config"), ("weights", "model weights")])
def test_mismatched_ranks_are_detected_at_start(tmp_path, fault, field):
    res, _ = launch(tmp_path, 2, "--fault", fault)
    for q in range(2):
        assert res[q]["error_type"] == "DistributedError"
        assert f"rank 1's {field} differs from rank 0's" in res[q]["error"]


def test_a_rank_that_dies_gives_a_clear_error_not_a_hang(tmp_path):
    t0 = time.monotonic()
    res, rc = launch(tmp_path, 2, "--fault", "die", timeout=15.0)
    assert rc[1] == 3 and 1 not in res
    assert res[0]["error_type"] == "DistributedError"
    assert "another rank died" in res[0]["error"] and "rank 0 of 2" in res[0]["error"]
    assert time.monotonic() - t0 < 120


def test_a_rank_that_stalls_gives_a_clear_error_within_the_timeout(tmp_path):
    res, rc = launch(tmp_path, 2, "--fault", "stall", timeout=5.0)
    assert res[0]["error_type"] == "DistributedError" and "rank 0 of 2" in res[0]["error"]
    assert res[0]["seconds"] < 5.0 * 2.5  # the group's timeout, not the stalled rank's sleep, ends the wait


def test_a_rank_that_never_joins_times_out_with_a_clear_error(tmp_path):
    res, _ = launch(tmp_path, 2, "--fault", "never", timeout=5.0)
    assert res[0]["error_type"] == "DistributedError"
    assert "could not form the group of 2 ranks" in res[0]["error"] and "a rank did not start" in res[0]["error"]
    assert res[0]["seconds"] < 60


EVAL = ["--train-steps", "40", "--n-test", "64", "--batch-size", "16", "--no-progress", "--no-plot", "--threads", "1",
        "--corruptions", "gaussian_noise,contrast,fog"]


def _eval(cmd, tmp_path, name):
    out = tmp_path / name
    p = subprocess.run([*cmd, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)], capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return p, out


def test_torchrun_evaluation_equals_one_process(tmp_path):
    pytest.importorskip("sklearn")
    import json

    one, out1 = _eval([sys.executable, "-m", "imse_kernels.eval", *EVAL, "--method", "source,imse"], tmp_path, "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two, out2 = _eval([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "imse_kernels.eval", *EVAL, "--method", "source,imse"], tmp_path, "two")
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("data-parallel over 2 ranks (gloo)") == 1  # rank 0 alone reports
    a, b = (json.loads((o / "results.json").read_text()) for o in (out1, out2))
    assert b["meta"]["ranks"] == 2 and a["meta"]["ranks"] == 1
    for m in ("source", "imse"):
        assert b["methods"][m]["correct"] == a["methods"][m]["correct"], m
        assert [(e["batch"], e["kind"], e["entry"]) for e in b["methods"][m]["events"]] == \
            [(e["batch"], e["kind"], e["entry"]) for e in a["methods"][m]["events"]]
    assert any(e["kind"] == "shift" for e in a["methods"]["imse"]["events"])


def test_torchrun_refuses_methods_that_are_not_data_parallel(tmp_path):
    pytest.importorskip("sklearn")
    p, _ = _eval([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "imse_kernels.eval", *EVAL, "--method", "tent"], tmp_path, "tent")
    assert p.returncode != 0
    assert "only data-parallel methods run" in p.stderr and "tent would adapt each rank's shard" in p.stderr
