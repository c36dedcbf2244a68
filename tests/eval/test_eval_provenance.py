"""What imse-eval records about a run: checkpoint hash, method hyper-parameters, versions, git commit, device."""
import dataclasses
import hashlib
import json
import platform

import pytest
import torch

from imse_kernels import provenance as P


def test_sha256_is_hashlib_of_the_file(tmp_path):
    f = tmp_path / "weights.bin"
    blob = bytes(range(256)) * 5000  # > one read chunk
    f.write_bytes(blob)
    assert P.sha256_file(f) == hashlib.sha256(blob).hexdigest()
    assert P.sha256_file(f, chunk=1000) == hashlib.sha256(blob).hexdigest()
    assert P.sha256_file(tmp_path / "absent") is None


def test_versions_and_device():
    v = P.versions()
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    import numpy
    import safetensors
    import timm

    assert (v["numpy"], v["timm"], v["safetensors"]) == (numpy.__version__, timm.__version__, safetensors.__version__)
    assert "triton" in v  # a version or None
    d = P.device_info("cpu")
    assert d["device"] == "cpu" and isinstance(d["cpu"], str) and d["cpu"]
    if torch.cuda.is_available():
        assert P.device_info("cuda")["cuda_device"] == torch.cuda.get_device_name(0)


def test_environment_is_the_benchmarks_flat_record(tmp_path):
    env = P.environment("cpu", root=tmp_path)
    assert list(env) == ["timestamp", "hostname", "python", "platform", "cpu", "cpu_count", "torch_threads",
                         "omp_wait_policy", "torch", "torch_cuda", "triton", "timm", "git_commit", "git_dirty",
                         "device"]
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert (env["git_commit"], env["git_dirty"]) == (None, False), "not a checkout: no commit, no error"
    json.dumps(env)


def test_git_commit_of_a_checkout_and_none_outside(tmp_path):
    info = P.git_info()
    root = P._checkout_root()
    if root is None:
        assert info == {"commit": None, "dirty": None}
    else:
        assert info["commit"] is None or len(info["commit"]) == 40
    assert P.git_info(tmp_path) == {"commit": None, "dirty": None}, "not a checkout: None, no error"


@dataclasses.dataclass
class _Cfg:
    lr: float = 0.01
    betas: tuple = (0.9, 0.99)
    blocks: object = None


class _WithConfig(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Cfg(blocks=(1, 2))
        self.lin = torch.nn.Linear(2, 2)


class _Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.threshold, self.mode, self.steps_taken = 0.4, "soft", 7
        self.optimizer = torch.optim.SGD(self.lin.parameters(), lr=0.05, momentum=0.8)


def test_method_config_generic_and_method_specific():
    from imse_kernels.tta import IMSE, IMSEConfig, Source, Tent

    assert P.method_config(_WithConfig()) == {"class": "_WithConfig",
                                              "config": {"lr": 0.01, "betas": [0.9, 0.99], "blocks": [1, 2]}}
    plain = P.method_config(_Plain())
    assert plain["threshold"] == 0.4 and plain["mode"] == "soft" and "steps_taken" not in plain
    assert plain["optimizer"]["class"] == "SGD"
    assert plain["optimizer"]["param_groups"][0]["lr"] == 0.05
    assert plain["optimizer"]["param_groups"][0]["momentum"] == 0.8

    import timm

    model = timm.create_model("test_vit", pretrained=False, num_classes=4).eval()
    assert P.method_config(Source(model)) == {"class": "Source"}
    tent = P.method_config(Tent(model, optim="sgd", lr=0.02, momentum=0.7))
    g = tent["optimizer"]["param_groups"][0]
    assert tent["class"] == "Tent" and tent["optimizer"]["class"] == "SGD" and (g["lr"], g["momentum"]) == (0.02, 0.7)
    assert tent["config"]["steps"] == 1 and tent["config"]["episodic"] is False
    cfg = IMSEConfig(lr=1e-3, retrieval="mix")
    imse = P.method_config(IMSE(model, cfg))
    assert imse["class"] == "IMSE" and imse["config"] == json.loads(json.dumps(P.jsonable(dataclasses.asdict(cfg))))
    assert imse["config"]["lr"] == 1e-3 and imse["config"]["retrieval"] == "mix"
    json.dumps([tent, imse, plain])  # JSON-ready


def test_collect_has_every_field(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"not really weights")
    rec = P.collect(model="m", checkpoint=str(ckpt), device="cpu", images_per_domain=64, seeds={"run": [0, 1]},
                    setting="correlated", severity=3, dirichlet=0.1, methods={"source": {"class": "Source"}})
    for key in ("model", "checkpoint", "checkpoint_sha256", "images_per_domain", "seeds", "setting", "severity",
                "dirichlet", "methods", "versions", "git", "device"):
        assert key in rec, key
    assert rec["checkpoint_sha256"] == hashlib.sha256(b"not really weights").hexdigest()
    assert set(rec["git"]) == {"commit", "dirty"} and rec["device"]["device"] == "cpu"
    assert "sha256 " + rec["checkpoint_sha256"][:12] in P.summary_line(rec)
    json.dumps(rec)
    assert P.collect(model="m", checkpoint=None, device="cpu", images_per_domain=1, seeds={}, setting="continual",
                     severity=5)["checkpoint_sha256"] is None


@pytest.mark.parametrize("value, want", [((1, 2), [1, 2]), (torch.tensor(3.5), 3.5), (torch.float32, "torch.float32"),
                                         ({"a": (1,)}, {"a": [1]})])
def test_jsonable(value, want):
    assert P.jsonable(value) == want
