"""Checkpoints as people keep them, written here from a tiny timm ViT: one test per format and per error.

Every format must give the source model's logits; every error must be one line naming the file and the fix.
"""
import argparse
import json
import pickle
import socket
import subprocess

import numpy as np
import pytest
import torch
from eval_files import PickledOsCall, write_hub_cache, write_safetensors

from imse_kernels.eval import checkpoints as ck
from imse_kernels.eval.errors import DataError
from imse_kernels.eval.models import build_timm_model

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def src():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


@pytest.fixture(scope="module")
def sd(src):
    return {k: v.clone() for k, v in src.state_dict().items()}


def _same_model(loaded, src, size=160):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(loaded.model(x), src((x - 0.5) / 0.5), atol=1e-4, rtol=1e-4)


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        call(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


class Hparams:
    """A Lightning module's hyper-parameter object: a class the loader must not import."""

    def __init__(self):
        self.lr = 0.1


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


# ------------------------------------------------------------------------------------------------- formats

FORMATS = {
    "safetensors": lambda sd, p: write_safetensors(sd, p / "w.safetensors"),
    "pytorch_model.bin": lambda sd, p: torch.save(sd, p / "pytorch_model.bin") or p / "pytorch_model.bin",
    "pth": lambda sd, p: torch.save(sd, p / "w.pth") or p / "w.pth",
    "pth_legacy_format": lambda sd, p: torch.save(sd, p / "w.pth", _use_new_zipfile_serialization=False) or p / "w.pth",
    "ddp_module_prefix": lambda sd, p: torch.save({"module." + k: v for k, v in sd.items()}, p / "w.pt") or p / "w.pt",
    "compiled_ddp": lambda sd, p: torch.save({"_orig_mod.module." + k: v for k, v in sd.items()}, p / "w.pt")
    or p / "w.pt",
    "deit_model_key": lambda sd, p: torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(lr=5e-4)},
                                               p / "deit.pth") or p / "deit.pth",
    "timm_train_py": lambda sd, p: torch.save({"epoch": 9, "arch": "test_vit", "state_dict": sd, "optimizer": {},
                                               "version": 2, "args": argparse.Namespace(model="test_vit"),
                                               "metric": 71.5}, p / "model_best.pth.tar") or p / "model_best.pth.tar",
    "lightning": lambda sd, p: torch.save(
        {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
         "state_dict": {**{"model." + k: v for k, v in sd.items()}, "criterion.weight": torch.ones(3)},
         "optimizer_states": [{}], "lr_schedulers": [], "hyper_parameters": {"cfg": Hparams()}},
        p / "last.ckpt") or p / "last.ckpt",
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_loads_the_same_model(tmp_path, src, sd, fmt):
    path = FORMATS[fmt](sd, tmp_path)
    loaded = build_timm_model("test_vit", str(path))
    assert _same_model(loaded, src)
    assert loaded.warnings == [] and loaded.data_config["input_size"] == (3, 160, 160)
    assert "state_dict" not in loaded.model.pretrained_cfg, "the file's tensors are not kept in the config"
    info = loaded.info()
    assert info["checkpoint"] == str(path) and json.dumps(info)
    if fmt in ("ddp_module_prefix", "compiled_ddp", "lightning"):
        assert "".join(loaded.stripped) == {"ddp_module_prefix": "module.", "compiled_ddp": "_orig_mod.module.",
                                            "lightning": "model."}[fmt]
    if fmt == "lightning":
        assert loaded.container == "['state_dict']"
        assert any("left out 1 keys outside 'model.'" in n for n in loaded.notes)
        assert any("StandIn" in n or "Hparams" in n for n in loaded.notes), loaded.notes
    if fmt == "deit_model_key":
        assert loaded.container == "['model']"
    assert loaded.format == ("safetensors" if fmt == "safetensors" else
                             "torch-legacy" if fmt == "pth_legacy_format" else "torch-zip")


def test_timm_train_py_with_ema_weights(tmp_path, src, sd):
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"epoch": 1, "state_dict": sd, "state_dict_ema": ema, "args": argparse.Namespace()}, tmp_path / "c.pth")
    plain = ck.read_state_dict(tmp_path / "c.pth")
    assert torch.equal(plain.tensors["head.weight"], sd["head.weight"]) and plain.container == "['state_dict']"
    assert any("EMA weights" in n for n in plain.notes)
    with_ema = ck.read_state_dict(tmp_path / "c.pth", use_ema=True)
    assert torch.equal(with_ema.tensors["head.weight"], ema["head.weight"])
    assert _same_model(build_timm_model("test_vit", str(tmp_path / "c.pth")), src)


def _timm_config():
    return {"architecture": "test_vit", "num_classes": 1000, "num_features": 64, "global_pool": "token",
            "pretrained_cfg": {"tag": "r160_in1k", "input_size": [3, 160, 160], "interpolation": "bicubic",
                               "crop_pct": 0.95, "crop_mode": "center", "mean": [0.5, 0.5, 0.5],
                               "std": [0.5, 0.5, 0.5], "num_classes": 1000, "classifier": "head"}}


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_hugging_face_snapshot_directory(tmp_path, src, sd, weights):
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "config.json").write_text(json.dumps(_timm_config()))
    write_safetensors(sd, snap / weights) if weights.endswith("safetensors") else torch.save(sd, snap / weights)
    loaded = build_timm_model(None, str(snap))  # the architecture from its config.json
    assert loaded.name == "test_vit" and loaded.checkpoint == str(snap / weights) and _same_model(loaded, src)
    assert _same_model(build_timm_model("test_vit", str(snap)), src)


def test_hf_hub_names_from_the_local_cache_only(tmp_path, src, sd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    repo = "timm/test_vit.r160_in1k"
    write_hub_cache(tmp_path / "hub", repo, {"config.json": lambda p: p.write_text(json.dumps(_timm_config())),
                                             "model.safetensors": lambda p: write_safetensors(sd, p)})
    loaded = build_timm_model(f"hf-hub:{repo}", None)
    assert loaded.name == "test_vit" and _same_model(loaded, src)
    assert loaded.checkpoint.endswith("model.safetensors") and "hub" in loaded.checkpoint
    plain = FORMATS["pth"](sd, tmp_path)  # an hf-hub name with a file: the repo names the architecture
    assert build_timm_model(f"hf-hub:{repo}", str(plain)).name == "test_vit.r160_in1k"
    msg = _error(build_timm_model, "hf-hub:timm/not_here", None)
    assert msg.startswith("hf-hub:timm/not_here: not in the local Hugging Face cache")
    assert "nothing is downloaded" in msg
    assert "pass --checkpoint FILE" in msg


def test_a_32px_patch8_vit_with_img_size_and_patch_size(tmp_path):
    """The README's quickstart model: built as trained it loads exactly; built at timm's defaults it warns."""
    torch.manual_seed(2)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                              patch_size=8).eval()
    path = write_safetensors(small.state_dict(), tmp_path / "cifar_vit.safetensors")
    loaded = build_timm_model("vit_tiny_patch16_224", str(path), num_classes=10, img_size=32, patch_size=8)
    assert loaded.warnings == [] and loaded.data_config["input_size"] == (3, 32, 32)
    mean, std = torch.tensor(loaded.data_config["mean"]).view(1, 3, 1, 1), torch.tensor(loaded.data_config["std"])
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), small((x - mean) / std.view(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)
    resampled = build_timm_model("vit_tiny_patch16_224", str(path), num_classes=10)
    assert len(resampled.warnings) == 1
    w = resampled.warnings[0]
    assert "timm resamples its embeddings" in w and "position grid 4x4 -> 14x14" in w and "patch 8x8 -> 16" in w
    assert "pass --img-size 32 --patch-size 8" in w and "\n" not in w


# -------------------------------------------------------------------------------------------------- errors


def test_error_ten_class_head_without_num_classes(tmp_path):
    ten = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    torch.save(ten.state_dict(), tmp_path / "ten.pth")
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "ten.pth"))
    assert msg == (f"{tmp_path / 'ten.pth'}: its head has 10 classes (head.weight 10x64) but test_vit is built with "
                   "1000 (timm's default 1000); pass --num-classes 10")
    assert "pass --num-classes 10" in _error(build_timm_model, "test_vit", str(tmp_path / "ten.pth"), num_classes=7)
    assert torch.equal(build_timm_model("test_vit", str(tmp_path / "ten.pth"), num_classes=10).model.head.weight,
                       ten.head.weight)


def test_error_checkpoint_of_another_architecture(tmp_path, sd):
    path = write_safetensors(sd, tmp_path / "vit.safetensors")
    msg = _error(build_timm_model, "resnet18", str(path))
    assert msg.startswith(f"{path}: not a resnet18 checkpoint: none of its 122 tensors is in the file")
    assert "the file is a ViT of width 64, depth 6, patch 16, 1000 classes" in msg
    assert msg.endswith("pass the --model it was trained as")
    msg = _error(build_timm_model, "test_vit2", str(path))  # same family, other layout: the right name is offered
    assert "test_vit2's tensors are missing" in msg and msg.endswith("pass --model test_vit")
    wide = timm.create_model("test_vit", pretrained=False, embed_dim=96, num_heads=2)
    msg = _error(build_timm_model, "test_vit", str(write_safetensors(wide.state_dict(), tmp_path / "wide.safetensors")))
    assert "tensors differ in shape from test_vit (e.g. cls_token: 1x1x96 in the file, 1x1x64 in the model)" in msg


def test_error_config_json_given_as_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_timm_config()))
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "config.json"))
    assert msg == (f"{tmp_path / 'config.json'}: a model config (config.json), not weights; give the weights file "
                   "beside it: model.safetensors or pytorch_model.bin")


def test_error_half_downloaded_safetensors(tmp_path, sd):
    path = write_safetensors(sd, tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _error(build_timm_model, "test_vit", str(path))
    assert msg.startswith(f"{path}: damaged or incomplete safetensors file")
    assert msg.endswith("download it again (an interrupted download?)")
    path.write_bytes(data[:100])  # cut inside the header
    msg = _error(build_timm_model, "test_vit", str(path))
    assert msg.startswith(f"{path}: incomplete safetensors file: its header alone needs")


def test_error_directory_without_weights(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.log").write_text("")
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "run"))
    assert msg == (f"{tmp_path / 'run'}: a directory without model.safetensors or pytorch_model.bin (it holds: "
                   "events.log); give --checkpoint the weights file itself")


def test_error_truncated_torch_file(tmp_path, sd):
    torch.save(sd, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "w.pth"))
    assert msg.startswith(f"{tmp_path / 'w.pth'}: truncated or damaged") and msg.endswith("download or copy it again")


@pytest.mark.parametrize("content,text", [
    (b"", "empty file"),
    (b"<!DOCTYPE html><html>Sign in</html>", "an HTML/XML page, not weights"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "a Git LFS pointer"),
    (b"just some text\n", "not a checkpoint format this loader reads"),
])
def test_error_files_that_are_not_weights(tmp_path, content, text):
    (tmp_path / "w.pth").write_bytes(content)
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "w.pth"))
    assert msg.startswith(f"{tmp_path / 'w.pth'}: {text}")


def test_error_a_file_without_weights_inside(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "opt.pth"))
    assert "holds no weights: a dict with keys epoch, optimizer" in msg


def test_error_options_and_names():
    assert "needs --checkpoint FILE" in _error(build_timm_model, "test_vit", None)
    assert "unknown timm model 'vit_bse_patch16_224'; did you mean vit_base_patch16_224" in _error(
        build_timm_model, "vit_bse_patch16_224", __file__)
    assert "--num-classes must be a positive integer, got 0" in _error(build_timm_model, "test_vit", __file__,
                                                                       num_classes=0)


def test_error_img_size_for_a_model_without_it(tmp_path):
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "r.pth")
    msg = _error(build_timm_model, "test_resnet", str(tmp_path / "r.pth"), img_size=32)
    assert msg.startswith("test_resnet does not take --img-size") and msg.endswith("or use a ViT --model")


def test_error_npz_that_timm_cannot_read(tmp_path):
    np.savez(tmp_path / "w.npz", something=np.zeros(3))
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "w.npz"))
    assert msg.startswith(f"{tmp_path / 'w.npz'}: timm's .npz loader could not read it into test_vit")


# ------------------------------------------------------------------------------------ no pickled code runs


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_os_calls_are_refused(tmp_path, monkeypatch, sd):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:  # a plain pickle (legacy format)
        pickle.dump({"state_dict": PickledOsCall()}, f)
    assert "evil.pth" in _error(build_timm_model, "test_vit", str(tmp_path / "evil.pth"))
    torch.save({"state_dict": sd, "x": PickledOsCall()}, tmp_path / "evil_zip.pth")
    msg = _error(build_timm_model, "test_vit", str(tmp_path / "evil_zip.pth"))
    assert "cannot be read without running code it names" in msg
    assert not (tmp_path / "EVIL_RAN").exists()


def test_other_named_callables_become_inert_stand_ins(tmp_path, src, sd):
    marker = tmp_path / "RAN"
    torch.save({"state_dict": sd, "callback": RunsCode(str(marker))}, tmp_path / "c.pth")
    loaded = build_timm_model("test_vit", str(tmp_path / "c.pth"))
    assert not marker.exists() and _same_model(loaded, src)
    assert any("inert stand-ins" in n and ".call" in n for n in loaded.notes), loaded.notes


def test_key_prefix_matching_is_what_the_model_needs():
    shapes = {"a.w": (1,), "b.w": (1,)}
    t = torch.zeros(1)
    got = ck.strip_prefixes(ck.StateDict({"model.a.w": t, "model.b.w": t, "loss.w": t}, None, "x"), shapes)
    assert set(got.tensors) == {"a.w", "b.w"} and got.stripped == ["model."] and got.outside == ["loss.w"]
    same = ck.strip_prefixes(ck.StateDict({"a.w": t, "b.w": t}, None, "x"), shapes)
    assert same.stripped == [] and set(same.tensors) == {"a.w", "b.w"}
    foreign = ck.strip_prefixes(ck.StateDict({"vit.x": t, "vit.y": t}, None, "x"), shapes)
    assert foreign.stripped == [], "a prefix is removed only when that makes keys the model's"
