"""`IMSEConfig`: the hyper-parameters of IMSE with the official defaults (docs/design.md §6)."""
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .method_config import ConfigError, MethodConfig

#: Code retrieval on a new domain (see `IMSEConfig`). "<mode>_no_adapt" retrieves like <mode>, then stops adapting.
RETRIEVAL_MODES = ("top1", "mix", "mean", "continual", "none",
                   "top1_no_adapt", "mix_no_adapt", "mean_no_adapt", "continual_no_adapt")
BANK_POLICIES = ("keep_all", "drop_oldest", "merge_nearest")
OPTIMIZER_ON_RETRIEVAL = ("reset", "load", "continue")
#: Distances between domain descriptors; aliases (the official code's kl_div, l2_distance, and var) are accepted.
DISTANCES = ("skl", "mean", "variance", "l2")
DISTANCE_ALIASES = {"kl_div": "skl", "var": "variance", "l2_distance": "l2"}
PARTIAL_BATCH = ("auto", "official", "pool")


def canonical_distance(name: str, what: str = "IMSEConfig: distance") -> str:
    """`name` as one of `DISTANCES` (aliases map through `DISTANCE_ALIASES`); ConfigError naming `what` otherwise."""
    if isinstance(name, str) and name in DISTANCE_ALIASES:
        return DISTANCE_ALIASES[name]
    if not isinstance(name, str) or name not in DISTANCES:
        raise ConfigError(f"{what} must be one of {DISTANCES} (aliases {tuple(DISTANCE_ALIASES)}), got {name!r}")
    return name


@dataclass
class IMSEConfig(MethodConfig):
    """Official defaults: continual ImageNet-C, ViT-B/16, batch 64 (use lr=3e-3 for the recurring setting).

    lr, betas            Adam inside SAM; rho is SAM's radius (not adaptive).
    lr_scaling, lr_batch1_factor, batch_size   batch scaling of lr (`tta.lr_scaling`): the official code scales
                         nothing ("none": cfg.OPTIM.LR at any TEST.BATCH_SIZE).
    entropy_margin       reliable samples have entropy < entropy_margin · ln C.
    diversity_weight     λ in  L = H_reliable − λ · L_div.
    diversity_ratio      k = min(⌊r·ratio⌋, r − 1) smallest expert stds are averaged per layer.
    diversity_blocks     L_div is taken in this many last blocks (and divided by it).
    adapt_blocks         block indices whose `s` are optimised; None = all but the last three.
    retrieval            code retrieval on the first batch (full window) of a new domain, s₀ the source code,
                         s_i the stored codes, d_i = retrieval distance to entry i (official SVD.DYNAMIC_MODE):
                           "top1"       s ← s_j, j = argmin_i d_i (official top1_adapt, the default);
                           "mix"        s ← s₀ + Σ_i softmax(−d/temperature)_i (s_i − s₀)  (mix_adapt);
                           "mean"       s ← s₀ + mean_i (s_i − s₀) over every entry, source included: the
                                        plain average of the stored codes, distances unused (mean_adapt);
                           "continual"  s ← the newest entry's code, i.e. the code just adapted: s is kept,
                                        only the optimizer follows optimizer_on_retrieval (continual_adapt);
                           "none"       no retrieval at all (s and the optimizer untouched);
                           "<mode>_no_adapt" (top1, mix, mean, continual): retrieve as <mode>, then stop
                                        adapting for the rest of the stream (predict with the code in place;
                                        later shifts still store and retrieve). The official *_no_adapt modes
                                        also predict through the dense pretrained weight, ignoring the code
                                        (decompose_svd.py SVDLinear.forward); here the retrieved code is used.
                         The optimizer state for "load" is the nearest entry's in every mode (as official).
    shift_threshold      a shift is declared when the distance (`distance`) between running and current
                         patch-embedding statistics exceeds this. The official code uses one threshold
                         (SVD.DSS_K; 0.05 in cfgs/vit/imse.yaml) whatever the distance, so with another
                         distance than "skl" choose it in that distance's units.
    distance             "skl" (symmetric KL, default, official kl_div), "mean" = mean_c (μa − μb)²,
                         "variance" = mean_c (σa² − σb²)², "l2" = mean_c [(σa² − σb²)² + (μa − μb)²]
                         (official mean, variance, l2_distance; σ² the variance); used for shift detection
                         (official SVD.DOMAIN_DISTANCE) and, unless retrieval_distance is set, retrieval.
    retrieval_distance   None (= distance) or one of the distances: retrieval, mix weights and
                         merge_nearest use it (official SVD.RETRIEVAL_DISTANCE).
    stats_momentum       running stats ← m · running + (1 − m) · current, on full windows.
    steps, episodic      SAM updates per batch; restore s and the optimizer before every batch.
    Not in the official code (their defaults keep the official behaviour):
    stats_window         images per statistics window, for streams of small batches (see partial_batch).
    partial_batch        how a batch is described (the nominal batch size is the largest batch seen since
                         the stream (re)started, learned from the stream; a smaller one is "partial"):
                           "official"  every batch alone; a partial batch is compared with the running
                                       stats (shift detection, retrieval) but leaves them unchanged
                                       (official domain_info.py: no EMA below TEST.BATCH_SIZE);
                           "pool"      batches of at least stats_window images alone, smaller ones pooled
                                       with the most recent images into a window of stats_window images,
                                       the running stats moving once per stats_window new images;
                           "auto"      (default) "official" when the nominal batch size is at least
                                       stats_window, else "pool" (batch-1 and small-batch streams).
    max_entries, bank_policy   bound on the code bank (source entry included) and what happens past it.
    optimizer_on_retrieval     on a retrieval: "reset" (fresh Adam; official default of IMSE, cfgs/vit/imse.yaml),
                               "load" the nearest entry's stored optimizer state (reset where it has none, e.g.
                               the source), or "continue" with the current optimizer state (official
                               SVD.LOAD_OPTIMIZER_STATE reset | load | continue).
    """

    lr: float = 7e-3
    betas: tuple[float, float] = (0.9, 0.999)
    rho: float = 0.05
    entropy_margin: float = 0.4
    diversity_weight: float = 50.0
    diversity_ratio: float = 1.0
    diversity_blocks: int = 3
    adapt_blocks: Optional[Sequence[int]] = None
    retrieval: str = "top1"
    shift_threshold: float = 0.05
    distance: str = "skl"
    retrieval_distance: Optional[str] = None
    temperature: float = 1.0
    stats_momentum: float = 0.8
    stats_window: int = 64
    partial_batch: str = "auto"
    max_entries: Optional[int] = None
    bank_policy: str = "keep_all"
    optimizer_on_retrieval: str = "reset"


    def check(self) -> None:
        need = self.need
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two values in [0, 1), got {self.betas}")
        self.need_non_negative("rho", "diversity_weight")
        need(self.entropy_margin > 0, f"entropy_margin must be > 0, got {self.entropy_margin}")
        need(0 < self.diversity_ratio <= 1, f"diversity_ratio must be in (0, 1], got {self.diversity_ratio}")
        self.need_at_least("diversity_blocks", 1)
        self.need_choice("retrieval", RETRIEVAL_MODES)
        self.need_positive("shift_threshold", "temperature")
        self.distance = canonical_distance(self.distance)
        if self.retrieval_distance is not None:
            self.retrieval_distance = canonical_distance(self.retrieval_distance, "IMSEConfig: retrieval_distance")
        self.need_choice("partial_batch", PARTIAL_BATCH)
        self.need_fraction("stats_momentum")
        self.need_at_least("stats_window", 2)
        self.need_choice("bank_policy", BANK_POLICIES)
        need(self.max_entries is None or self.max_entries >= 2,
             f"max_entries must be None or an int >= 2 (the source entry counts), got {self.max_entries}")
        need((self.max_entries is None) == (self.bank_policy == "keep_all"),
             f"bank_policy {self.bank_policy!r} with max_entries={self.max_entries}: keep_all takes no bound, "
             "drop_oldest and merge_nearest need one")
        self.need_choice("optimizer_on_retrieval", OPTIMIZER_ON_RETRIEVAL)


def with_defaults(found: Mapping) -> dict:
    """A config dict saved by an older version (`dataclasses.asdict(IMSEConfig)`), completed with the
    defaults of the fields added since, so it compares equal to a default-built config of today."""
    return IMSEConfig.with_defaults(found)
