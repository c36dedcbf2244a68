"""Singular-value fine-tuning (SVF, as in Transformer²) of language models through the fused spectral op,
with per-sample mixing of K experts (docs/design.md, section 15).

    names = svf.to_svf(model, preset="auto", parts=("mlp",), decomposition="model.svd.safetensors")
    ... train the z vectors (svf.z_state(model) saves one expert) ...
    svf.set_experts(model, [expert_a, expert_b])
    with svf.mix_experts(model, alpha):      # alpha: (B, K), one mixture per sample
        logits = model(input_ids).logits
    svf.merge(model)                          # plain weights again
"""
from .conversion import load_z_state, merge, set_experts, svf_layers, to_svf, z_state
from .decomposition import decompose, load_decomposition, save_decomposition, svd_factors
from .experts import mix_experts
from .parametrization import MASKS, SVFConfig, svf_mask, svf_scale
from .svf_linear import SVFLinear

__all__ = ["SVFLinear", "SVFConfig", "MASKS", "svf_mask", "svf_scale", "to_svf", "merge", "svf_layers", "z_state",
           "load_z_state", "set_experts", "mix_experts", "decompose", "save_decomposition", "load_decomposition",
           "svd_factors"]
