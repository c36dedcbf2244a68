"""Losses of IMSE: softmax entropy with the reliable-sample filter, and the expert diversity loss with the
per-expert alignment moments it is computed from (`expert_stats`; plain torch, no dependency on `ops`)."""
from .diversity import diversity_loss, layer_diversity, lowest_k, lowest_k_mean
from .entropy import entropy_threshold, reliable_entropy, reliable_mask, softmax_entropy
from .expert_stats import ExpertMoments, expert_alignment_moments, std_from_moments

__all__ = [
    "softmax_entropy", "entropy_threshold", "reliable_mask", "reliable_entropy",
    "diversity_loss", "layer_diversity", "lowest_k", "lowest_k_mean",
    "ExpertMoments", "expert_alignment_moments", "std_from_moments",
]
