"""The embedded "shapes" benchmark: its world, its WebDataset splits, and the small
teachers bootstrapped on it (shipped in `demo_teachers/`, see the README there)."""
from pathlib import Path

DEMO_TEACHERS = Path(__file__).resolve().parent / "demo_teachers"
