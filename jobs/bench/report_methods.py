"""The methods `mcad bench report` compares: the teachers' three evaluations and six students.

STUDENTS maps each student to its TrainConfig overrides on the demo's
(jobs/bench/report.py's module doc says what each ablation changes); LABELS
names every method in the tables and plots. Shared by the report's run
(jobs/bench/report.py) and its statistics (jobs/bench/report_stats.py).
"""
from __future__ import annotations

STUDENTS = {  # name -> TrainConfig overrides on the demo's (alpha, beta from the demo config)
    "baseline": dict(w_dist=0.0, w_feat=0.0),
    "dual_kd": dict(alpha=0.0, beta=0.0),
    "alpha0": dict(alpha=0.0),
    "beta0": dict(beta=0.0),
    "no_feat": dict(w_feat=0.0),
    "mcad": dict(),
}
TEACHERS = ("dual", "single", "combined")
METHODS = tuple(f"teacher_{t}" for t in TEACHERS) + tuple(STUDENTS)
LABELS = {
    "teacher_dual": "teacher dual (CLIP)",
    "teacher_single": "teacher single (BLIP-ITM re-ranks dual top-16)",
    "teacher_combined": "teacher combined (dual + beta ITM)",
    "baseline": "student: contrastive only",
    "dual_kd": "student: dual-only KD (alpha = beta = 0)",
    "alpha0": "student: MCAD without fused features in the targets (alpha = 0)",
    "beta0": "student: MCAD without ITM logits in the distributions (beta = 0)",
    "no_feat": "student: MCAD without the feature loss (w_feat = 0)",
    "mcad": "student: full MCAD",
}
