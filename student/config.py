"""How a student learns: the training config and the loss weights, free of torch.

Plain frozen dataclasses, so the CLI can read their defaults for `--help`
without importing torch; `student/train.py` and `student/losses.py` use them.
Written to RUN/train_config.json beside every run.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from mcad.storage.errors import InputError


@dataclass(frozen=True)
class LossWeights:
    """Weights of the MCAD terms (and the ranking term, issue #18); a zero weight skips its term entirely."""

    con: float = 1.0
    dist: float = 1.0
    feat: float = 1.0
    rank: float = 0.0   # ranking distillation over the stored candidates (student/losses.rank_distillation)

    def __post_init__(self):
        for name, value in asdict(self).items():
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value >= 0):
                raise InputError(f"loss weight {name} must be a finite number >= 0, got {value!r}")
        if self.con == self.dist == self.feat == self.rank == 0:
            raise InputError("at least one loss weight (con, dist, feat, rank) must be > 0")


MODES = ("replay", "remix")
# Which stored view a sample shows in an epoch (docs/design.md, section 3, "Views"): cycle: view
# (epoch + row) mod N; random: drawn from (seed, epoch, shard, row); canonical: view 0, the whole image.
VIEW_POLICIES = ("cycle", "random", "canonical")
# How the ITM logits are scaled in the distribution target (docs/design.md, section 3, Targets):
# none: m as stored; pool: each pool block's m rescaled to the spread of its dual logits.
ITM_NORMS = ("none", "pool")
# The teacher order the ranking term follows: the single teacher's ITM logits, or the combined
# target z = s·v'·t' + β·m̃ (student/targets.py).
RANK_TARGETS = ("itm", "combined")


@dataclass(frozen=True)
class TrainConfig:
    """How a student learns from the signals; written to RUN/train_config.json."""

    mode: str = "replay"          # replay: batches are whole pools; remix: any rows
    views: str = "cycle"          # VIEW_POLICIES; a store without views has only view 0
    # Every default below marked "val" was chosen on the shapes val split (docs/results/val-sweep).
    alpha: float = 1.0            # weight of the single teacher's fused features in v', t' (val)
    beta: float = 0.5             # weight of the single teacher's ITM logits in the distribution (val)
    k_prime: int | None = None    # candidates used per row (<= K); None: all K (val)
    # T of the distribution KL (both sides' logits / T, KL x T^2). The stored teacher
    # distributions are near one-hot, so T > 1 shows the student the teachers' ranking of
    # the negatives (docs/design.md, section 3). Chosen on val from 1, 2, 4, 8.
    kd_temperature: float = 4.0
    w_con: float = 1.0
    w_dist: float = 1.0           # (val)
    w_feat: float = 1.0           # (val)
    # Issue #18's levers, chosen on val (docs/results/levers/select): no ranking term, and the
    # ITM logits rescaled per pool to the dual logits' spread (502.2 against 499.6 val rsum).
    w_rank: float = 0.0           # (val) ranking distillation (ListMLE over the stored top-K' candidates)
    rank_by: str = "itm"          # RANK_TARGETS: whose order of the candidates the ranking term follows
    itm_temperature: float = 1.0  # (val) the ITM part of the distribution target is beta * m / itm_temperature
    itm_norm: str = "pool"        # (val) ITM_NORMS: "pool" rescales m to the dual logits' spread per pool first
    # Chosen on val from 6, 10, 15 with the other settings chosen (docs/results/val-sweep).
    epochs: int = 15
    pools_per_batch: int = 1      # replay
    batch_size: int = 256         # remix
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.05          # fraction of all steps
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.views not in VIEW_POLICIES:
            raise InputError(f"views must be one of {VIEW_POLICIES}, got {self.views!r}")
        if self.rank_by not in RANK_TARGETS:
            raise InputError(f"rank_by must be one of {RANK_TARGETS}, got {self.rank_by!r}")
        if self.itm_norm not in ITM_NORMS:
            raise InputError(f"itm_norm must be one of {ITM_NORMS}, got {self.itm_norm!r}")
        if not (self.itm_temperature > 0 and math.isfinite(self.itm_temperature)):
            raise InputError(f"itm_temperature must be a finite number > 0, got {self.itm_temperature}")
        for name in ("alpha", "beta", "w_con", "w_dist", "w_feat", "w_rank", "lr", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "pools_per_batch", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.kd_temperature > 0:
            raise InputError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.k_prime is not None and self.k_prime < 1:
            raise InputError(f"k_prime must be at least 1, got {self.k_prime}")
        self.weights()  # refuses all-zero weights

    def weights(self) -> LossWeights:
        return LossWeights(con=self.w_con, dist=self.w_dist, feat=self.w_feat, rank=self.w_rank)

    @property
    def needs_targets(self) -> bool:
        return self.w_dist > 0 or self.w_feat > 0 or self.w_rank > 0
