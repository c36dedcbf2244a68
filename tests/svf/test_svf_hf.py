"""SVF of Hugging Face causal LMs (docs/design.md, section 15) on random-init tiny configs, no downloads:
logits after conversion (Llama, Mistral, Qwen2, GPT-2's Conv1D), gradients of z, α and the experts against
the dense formulation in float64, merge round trip, the decomposition file (including damaged files),
bf16 weights, the README example and the benchmark's smoke run."""
import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")

from imse_kernels import FusedSpectralLinear, spectralize, svf, unspectralize  # noqa: E402
from imse_kernels.layers.conv1d import is_conv1d  # noqa: E402
from imse_kernels.state_file import StateFileError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 97
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
}


def tiny(family, dtype=torch.float32, seed=0):
    cfg_name, model_name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw))
    return model.to(dtype).eval()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def ids(b=2, t=9, seed=3):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def dense_params(model, layers, codes=None):
    """Transformer²'s formulation for torch.func.functional_call: each adapted weight recomposed as
    U·diag_embed(S ⊙ m)·Vh·ΣS/Σ(S ⊙ m) with autograd (Conv1D weights stored transposed)."""
    out = {}
    for name, layer in layers.items():
        z = layer.z if codes is None else codes[name]
        m = torch.sigmoid(z)
        W = layer.U @ torch.diag_embed(layer.S * m) @ layer.Vh * (layer.S.sum() / (layer.S * m).sum())
        out[name + ".weight"] = W.t() if is_conv1d(model.get_submodule(name)) else W
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_after_conversion(family):
    model, x = tiny(family), ids()
    with torch.no_grad():
        ref = model(x).logits
    names = svf.to_svf(model, parts=("attn", "mlp"))
    assert len(names) == (4 if family == "gpt2" else 7) * 2
    assert all(isinstance(model.get_submodule(n), svf.SVFLinear) for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n + ".z" for n in names]
    with torch.no_grad():
        assert rel(model(x).logits, ref) < 2e-6
    svf.merge(model)
    with torch.no_grad():
        assert rel(model(x).logits, ref) < 2e-6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_spectralize_presets_and_conv1d_round_trip(family):
    model, x = tiny(family), ids()
    original = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model(x).logits
    names = spectralize(model, preset="auto")
    assert len(names) == (4 if family == "gpt2" else 7) * 2
    assert all(isinstance(model.get_submodule(n), FusedSpectralLinear) for n in names)
    with torch.no_grad():
        assert rel(model(x).logits, ref) < 2e-6
    unspectralize(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert max(rel(state[k], original[k]) for k in original if original[k].abs().max() > 0) < 2e-6
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_z_gradients_equal_the_dense_formulation_float64(family):
    model, x = tiny(family, torch.float64), ids()
    original = copy.deepcopy(model)
    svf.to_svf(model, parts=("attn", "mlp"), svd_dtype=torch.float64)
    layers = svf.svf_layers(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in layers.values():
            m.z.copy_(torch.randn(m.rank, generator=g, dtype=torch.float64))
    weight = torch.randn(2, 9, VOCAB, generator=g, dtype=torch.float64)
    (model(x).logits * weight).sum().backward()
    dense = dense_params(original, layers)
    logits = torch.func.functional_call(original, dense, (x,)).logits
    grads = torch.autograd.grad((logits * weight).sum(), [m.z for m in layers.values()])
    err = max(rel(m.z.grad, gz) for m, gz in zip(layers.values(), grads))
    assert err <= 1e-10


def test_mixed_expert_gradients_equal_the_dense_formulation_float64():
    model, x = tiny("llama", torch.float64), ids(b=3)
    original = copy.deepcopy(model)
    svf.to_svf(model, parts=("attn", "mlp"), svd_dtype=torch.float64)
    layers = svf.svf_layers(model)
    g = torch.Generator().manual_seed(7)
    experts = [{n: torch.randn(m.rank, generator=g, dtype=torch.float64) for n, m in layers.items()} for _ in range(3)]
    svf.set_experts(model, experts, trainable=True)
    alpha = torch.softmax(torch.randn(3, 3, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    weight = torch.randn(3, 9, VOCAB, generator=g, dtype=torch.float64)
    with svf.mix_experts(model, alpha):
        logits = model(x).logits
    (logits * weight).sum().backward()

    a2 = alpha.detach().clone().requires_grad_(True)
    Z = {n: m.experts.detach().clone().requires_grad_(True) for n, m in layers.items()}
    rows = [torch.func.functional_call(original, dense_params(original, layers, {n: a2[b] @ Z[n] for n in Z}),
                                       (x[b:b + 1],)).logits for b in range(3)]
    dense = torch.cat(rows)
    (dense * weight).sum().backward()
    assert rel(logits, dense) <= 1e-12
    assert rel(alpha.grad, a2.grad) <= 1e-10
    assert max(rel(m.experts.grad, Z[n].grad) for n, m in layers.items()) <= 1e-10


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_merge_round_trip_after_training(family):
    model, x = tiny(family), ids()
    original = copy.deepcopy(model)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    svf.to_svf(model, parts=("attn", "mlp"))
    layers = svf.svf_layers(model)
    opt = torch.optim.Adam([m.z for m in layers.values()], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    with torch.no_grad():
        adapted = model(x).logits
        want = {n: w.detach() for n, w in dense_params(original, layers).items()}
    assert rel(adapted, original(x).logits) > 1e-3  # training moved it
    svf.merge(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # the checkpoint's own layout
    assert all(type(model.get_submodule(n)) is type(original.get_submodule(n)) for n in layers)
    state = model.state_dict()
    assert max(rel(state[k], w) for k, w in want.items()) < 2e-6
    with torch.no_grad():
        assert rel(model(x).logits, adapted) < 2e-6


def test_decomposition_is_computed_once_and_reloaded(tmp_path, monkeypatch):
    model, x = tiny("llama"), ids()
    path = tmp_path / "llama.svd.safetensors"
    first = copy.deepcopy(model)
    names = svf.to_svf(first, decomposition=path)
    assert path.exists()
    second = copy.deepcopy(model)

    def no_svd(*a, **k):
        raise AssertionError("the decomposition should have been loaded, not computed")

    monkeypatch.setattr(svf.conversion, "decompose", no_svd)
    assert svf.to_svf(second, decomposition=path) == names
    for n in names:
        a, b = first.get_submodule(n), second.get_submodule(n)
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    with torch.no_grad():
        assert torch.equal(first(x).logits, second(x).logits)
    factors = svf.load_decomposition(path)
    assert sorted(factors) == sorted(names) and factors[names[0]][1].dtype == torch.float32


def test_damaged_or_foreign_decomposition_files_are_rejected(tmp_path):
    model = tiny("llama")
    path = tmp_path / "d.safetensors"
    svf.to_svf(copy.deepcopy(model), decomposition=path)
    data = path.read_bytes()

    damaged = tmp_path / "damaged.safetensors"
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # inside the last tensor's bytes
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(StateFileError, match="is damaged"):
        svf.to_svf(copy.deepcopy(model), decomposition=damaged)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match="not a readable safetensors file"):
        svf.load_decomposition(truncated)

    with pytest.raises(StateFileError, match="differs from the one the file was computed from"):
        svf.to_svf(tiny("llama", seed=1), decomposition=path)

    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(StateFileError, match="not an imse_kernels SVF decomposition"):
        svf.load_decomposition(plain)
    with pytest.raises(StateFileError, match="has no factors for layer"):
        svf.to_svf(copy.deepcopy(model), parts=("attn",), decomposition=path)


def test_bf16_weights():
    model32, x = tiny("llama"), ids()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    with torch.no_grad():
        ref32, ref16 = model32(x).logits, model(x).logits
    names = svf.to_svf(model, parts=("attn", "mlp"))
    layer = model.get_submodule(names[0])
    assert layer.U.dtype == layer.Vh.dtype == torch.bfloat16 and layer.S.dtype == layer.z.dtype == torch.float32
    with torch.no_grad():
        out = model(x).logits
    assert out.dtype == torch.bfloat16
    # bf16 factors round like bf16 weights: the error against fp32 is that of the bf16 model itself
    assert rel(out.float(), ref32) < 3 * max(rel(ref16.float(), ref32), 1e-2)
    model(x, labels=x).loss.backward()
    assert all(torch.isfinite(m.z.grad).all() and m.z.grad.abs().sum() > 0 for m in svf.svf_layers(model).values())


def test_readme_svf_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    code = next(b for b in blocks if "mix_experts" in b)
    namespace = {}
    exec(compile(code, "README SVF example", "exec"), namespace)
    losses, mixed = namespace["losses"], namespace["mixed"]
    assert losses[-1] < losses[0]
    assert mixed.shape[0] == 2 and torch.isfinite(mixed).all()


def test_svf_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "svf_bench.py"), "--quick", "--out-dir",
                           str(tmp_path), "--no-memory"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("svf_*_quick.json")).read_text())
    fp32 = next(r for r in result["train"] if r["dtype"] == "fp32")
    assert fp32["z_grad_rel_err"] < 1e-4 and fp32["state_ratio"] < 0.45
    assert all(r["mixed_vs_loop_logits_rel_err"] < 1e-4 for r in result["infer"] if r["dtype"] == "fp32")
