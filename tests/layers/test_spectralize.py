"""`spectralize` / `unspectralize` on timm models and plain module trees."""
import pytest
import timm
import torch
from torch import nn

from imse_kernels import FusedSpectralLinear, spectral_layers, spectralize, unspectralize

TINY = {
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    "deit": dict(model_name="deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    "swin": dict(model_name="swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=24,
                 depths=(1, 1), num_heads=(2, 4)),
    "mixer": dict(img_size=32, patch_size=8, embed_dim=48, num_blocks=2),
}


def _tiny(kind):
    kwargs = dict(TINY[kind])
    if kind == "mixer":
        return timm.models.mlp_mixer.MlpMixer(num_classes=10, **kwargs).eval()
    return timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=10, **kwargs).eval()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_timm_models_round_trip(kind):
    model = _tiny(kind)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    names = spectralize(model)
    assert names and len(names) < n_linear  # the head (at least) is not converted
    assert all(isinstance(model.get_submodule(n), FusedSpectralLinear) for n in names)
    assert list(spectral_layers(model)) == names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.s" for n in names]
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    assert unspectralize(model) == names
    assert not spectral_layers(model)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_vit_default_names():
    names = spectralize(_tiny("vit"))
    assert names == [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_include_exclude_on_plain_tree():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    names = spectralize(model, include=["*"], exclude=["2.1"])
    assert names == ["0", "2.0"]
    assert isinstance(model[2][1], nn.Linear) and not model[2][1].weight.requires_grad


def test_no_match_warns():
    with pytest.warns(UserWarning, match="no nn.Linear matched"):
        assert spectralize(nn.Sequential(nn.Linear(4, 4))) == []


def test_filter_fn_as_in_quantize():
    """filter_fn(module, fqn) chooses, as torchao's quantize_ does; include narrows it further."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    seen = []

    def wide(m, fqn):
        seen.append(fqn)
        return m.out_features >= 16

    assert spectralize(model, wide) == ["0", "2.0"]
    assert seen == ["0", "2.0", "2.1"]  # asked only about nn.Linear layers
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    assert spectralize(model, wide, include=["2.*"]) == ["2.0"]


def test_freeze_false_and_unspectralize_restores_requires_grad():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model[1].bias.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    spectralize(model, include=["0"], freeze=False)
    assert model[1].weight.requires_grad and model[2].weight.requires_grad  # untouched
    unspectralize(model)
    spectralize(model, include=["0"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.s"]
    unspectralize(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_old_positional_include_still_works():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    with pytest.warns(DeprecationWarning, match="include=... by keyword"):
        assert spectralize(model, ["1"]) == ["1"]
