"""Model loading for imse-eval: local timm checkpoints, normalisation folding, the embedded model's cache."""
import os
import pickle

import pytest
import torch
from eval_files import PickledOsCall

from imse_kernels.eval import models as M
from imse_kernels.eval.digits import load_splits
from imse_kernels.eval.errors import DataError


def _test_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def test_folding_into_the_patch_embedding_is_exact():
    model = _test_vit()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.rand(2, 3, 160, 160)
    want = model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    folded = M.fold_normalization(model, mean, std)
    assert folded is model, "a ViT absorbs the normalisation in patch_embed.proj"
    assert torch.allclose(folded(x), want, atol=1e-4, rtol=1e-4)


def test_models_with_padded_stems_get_a_normalize_module():
    import timm

    model = timm.create_model("test_resnet", pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64)
    want = model((x - 0.4) / 0.3)
    wrapped = M.fold_normalization(model, (0.4,) * 3, (0.3,) * 3)
    assert isinstance(wrapped[0], M.Normalize)
    assert torch.allclose(wrapped(x), want, atol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_model_from_a_local_file(tmp_path, fmt):
    src = _test_vit()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    model, cfg = M.load_timm_model("test_vit", str(path))
    assert cfg["input_size"] == (3, 160, 160) and cfg["mean"] == (0.5, 0.5, 0.5)
    x = torch.rand(2, 3, 160, 160)
    assert torch.allclose(model(x), src((x - 0.5) / 0.5), atol=1e-4, rtol=1e-4)


def test_checkpoint_with_its_own_head_size_keeps_its_head(tmp_path):
    import timm

    torch.manual_seed(1)
    src = timm.create_model("test_vit", pretrained=False, num_classes=7).eval()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model, _ = M.load_timm_model("test_vit", str(tmp_path / "w.pt"), num_classes=7)
    assert torch.equal(model.head.weight, src.head.weight)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope.safetensors: checkpoint file not found"):
        M.load_timm_model("test_vit", str(tmp_path / "nope.safetensors"))
    with pytest.raises(DataError, match="needs --checkpoint"):
        M.load_timm_model("test_vit", None)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_in_a_checkpoint_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": PickledOsCall()}, f)
    with pytest.raises(DataError, match="evil.pth"):
        M.load_timm_model("test_vit", str(tmp_path / "evil.pth"))
    assert not (tmp_path / "EVIL_RAN").exists()


def test_embedded_model_trains_once_deterministically_then_loads_from_cache(tmp_path):
    pytest.importorskip("sklearn")
    train, test = load_splits(n_test=100, seed=0)
    cfg = M.EmbeddedConfig(steps=4, n_test=100)
    m1, info1 = M.load_or_train_embedded(cfg, train, test, str(tmp_path), log=lambda s: None)
    assert info1["trained_now"] and os.path.isfile(info1["cache"])
    assert info1["cache"].endswith(".safetensors") and 0 <= info1["clean_test_accuracy"] <= 1
    m2, info2 = M.load_or_train_embedded(cfg, train, test, str(tmp_path), log=lambda s: None)
    assert not info2["trained_now"] and info2["cache"] == info1["cache"]
    again = M.train_embedded(cfg, train)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
        assert torch.equal(v, again.state_dict()[k]), f"training is not deterministic for a seed: {k}"
    assert M.accuracy(m2, test) == info1["clean_test_accuracy"]
    other = M.EmbeddedConfig(steps=5, n_test=100)
    assert other.key() != cfg.key()


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    from imse_kernels.eval.cache import cache_dir

    monkeypatch.setenv("IMSE_KERNELS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert cache_dir(str(tmp_path / "d")) == tmp_path / "d"
