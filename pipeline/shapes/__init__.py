"""The embedded "shapes" benchmark: its world, its WebDataset splits, and the small
teachers bootstrapped on it (shipped in `demo_teachers/`, see the README there)."""
from pathlib import Path

DEMO_TEACHERS = Path(__file__).resolve().parent / "demo_teachers"
# The shipped teachers' train split holds out the val and test meanings of the benchmarks of
# seeds 0 .. DEMO_TEACHERS_SEEDS - 1 (`mcad data synth --hold-out-seeds 0,1,2,3,4`, see their README):
# only on those seeds is their test split unseen by them.
DEMO_TEACHERS_SEEDS = 5
