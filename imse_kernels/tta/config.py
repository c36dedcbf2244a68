"""`IMSEConfig`: the hyper-parameters of IMSE with the official defaults (docs/design.md §6)."""
from dataclasses import dataclass
from typing import Optional, Sequence

RETRIEVAL_MODES = ("top1", "mix", "none")
BANK_POLICIES = ("keep_all", "drop_oldest", "merge_nearest")
OPTIMIZER_ON_RETRIEVAL = ("reset", "load")


@dataclass
class IMSEConfig:
    """Official defaults: continual ImageNet-C, ViT-B/16, batch 64 (use lr=3e-3 for the recurring setting).

    lr, betas            Adam inside SAM; rho is SAM's radius (not adaptive).
    entropy_margin       reliable samples have entropy < entropy_margin · ln C.
    diversity_weight     λ in  L = H_reliable − λ · L_div.
    diversity_ratio      k = min(⌊r·ratio⌋, r − 1) smallest expert stds are averaged per layer.
    diversity_blocks     L_div is taken in this many last blocks (and divided by it).
    adapt_blocks         block indices whose `s` are optimised; None = all but the last three.
    retrieval            code retrieval on a new domain: "top1", "mix" (softmax(−KL/temperature)) or "none".
    shift_threshold      a shift is declared when the symmetric KL between running and current
                         patch-embedding statistics exceeds this.
    stats_momentum       running stats ← m · running + (1 − m) · current, on full windows.
    steps, episodic      SAM updates per batch; restore s and the optimizer before every batch.
    Not in the official code (their defaults keep the official behaviour):
    stats_window         images per statistics window; batches of at least this size are used alone
                         (official), smaller ones are pooled with the most recent images (batch size 1).
    max_entries, bank_policy   bound on the code bank (source entry included) and what happens past it.
    optimizer_on_retrieval     "reset" (official) or "load" the retrieved entry's optimizer state.
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
    temperature: float = 1.0
    stats_momentum: float = 0.8
    steps: int = 1
    episodic: bool = False
    stats_window: int = 64
    max_entries: Optional[int] = None
    bank_policy: str = "keep_all"
    optimizer_on_retrieval: str = "reset"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"IMSEConfig: {msg}")

        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(len(tuple(self.betas)) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two values in [0, 1), got {self.betas}")
        self.betas = tuple(float(b) for b in self.betas)
        need(self.rho >= 0, f"rho must be >= 0, got {self.rho}")
        need(self.entropy_margin > 0, f"entropy_margin must be > 0, got {self.entropy_margin}")
        need(self.diversity_weight >= 0, f"diversity_weight must be >= 0, got {self.diversity_weight}")
        need(0 < self.diversity_ratio <= 1, f"diversity_ratio must be in (0, 1], got {self.diversity_ratio}")
        need(isinstance(self.diversity_blocks, int) and self.diversity_blocks >= 1,
             f"diversity_blocks must be an int >= 1, got {self.diversity_blocks}")
        if self.adapt_blocks is not None:
            self.adapt_blocks = tuple(self.adapt_blocks)
            need(all(isinstance(b, int) for b in self.adapt_blocks),
                 f"adapt_blocks must be block indices, got {self.adapt_blocks}")
        need(self.retrieval in RETRIEVAL_MODES, f"retrieval must be one of {RETRIEVAL_MODES}, got {self.retrieval!r}")
        need(self.shift_threshold > 0, f"shift_threshold must be > 0, got {self.shift_threshold}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 <= self.stats_momentum < 1, f"stats_momentum must be in [0, 1), got {self.stats_momentum}")
        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps}")
        need(isinstance(self.stats_window, int) and self.stats_window >= 2,
             f"stats_window must be an int >= 2, got {self.stats_window}")
        need(self.bank_policy in BANK_POLICIES, f"bank_policy must be one of {BANK_POLICIES}, got {self.bank_policy!r}")
        need(self.max_entries is None or (isinstance(self.max_entries, int) and self.max_entries >= 2),
             f"max_entries must be None or an int >= 2 (the source entry counts), got {self.max_entries}")
        need((self.max_entries is None) == (self.bank_policy == "keep_all"),
             f"bank_policy {self.bank_policy!r} with max_entries={self.max_entries}: keep_all takes no bound, "
             "drop_oldest and merge_nearest need one")
        need(self.optimizer_on_retrieval in OPTIMIZER_ON_RETRIEVAL,
             f"optimizer_on_retrieval must be one of {OPTIMIZER_ON_RETRIEVAL}, got {self.optimizer_on_retrieval!r}")
