"""The accelerator path's half precision, checked on the CPU: the columns a pass stores for a real
pool (the shipped demo teachers, trained, on rendered shapes scenes), with both teachers in bfloat16
(CUDA's default) or float16 (CUDA without native bfloat16), against the same teachers in float32.

Tolerance. The store keeps embeddings as float16, and tests/pipeline/test_signals.py compares them
within 2e-3 = 4 units of float16's roundoff (2^-11). Computing in half precision does not meet
that: every weight and activation is rounded to the dtype's significant bits (roundoff u = 2^-8 =
3.9e-3 for bfloat16's 8 bits, 2^-11 for float16's 11), and the rounding of 3 to 6 layers adds up:
the demo teachers' features come out 2-5 u from float32 per row, in both dtypes (measured). So the
rule here is stated in the compute dtype's units, TOL = 8 u (at least 5 of bfloat16's 8 bits
kept; for float16 8 u = 3.9e-3, twice the store's tolerance):

- features (img_emb, txt_emb, fused, fused_proj): ||x - x32|| <= TOL ||x32|| per row;
- dual logits s v.t and their logsumexp: |d| <= 2 TOL s (|d(v.t)| <= ||dv|| + ||dt|| for unit
  vectors; s is read in float32 from the weights, so it adds no error);
- ITM logits m = (w1 - w0).f + b: |dm| <= TOL ||w1 - w0|| max ||f|| (the head's error on f's);
- candidates: half precision may swap near-ties, so the half run's candidate lists must be a top-K
  of the float32 logits within the logit tolerance (their float32 logits, sorted, equal the float32
  run's within 2 x that), and every value column is compared at the half run's own candidates.

Each bound is also checked to be well under the spread of what it bounds, so it can fail.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mcad.pipeline.shapes import DEMO_TEACHERS
from mcad.pipeline.shapes.world import canonical, make_scene, render
from mcad.pipeline.signals import candidate_columns, compute_pool
from mcad.pipeline.teachers import load_teachers
from mcad.storage.schema import DIRECTIONS, DUAL, DUAL_LSE, FUSED, FUSED_PROJ, IDX, IMG_EMB, ITM, ITM_POS, TXT_EMB, col

P, K = 16, 4
ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
DIRS = (DEMO_TEACHERS / "dual", DEMO_TEACHERS / "single")


@pytest.fixture(scope="module")
def pool():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, image_size=48, n_objects=1 + i % 3) for i in range(P)]
    return [SimpleNamespace(key=f"k{i}", image=render(s), caption=canonical(s)) for i, s in enumerate(scenes)]


@pytest.fixture(scope="module")
def reference(pool):
    """The float32 pass's columns, and the float32 matrices every half-precision column is read from:
    dual logits (P, P) and ITM logits of all P x P pairs, with the largest fused norm."""
    dual, single = load_teachers(*DIRS)
    projection = torch.randn(single.dim_fused, dual.dim, generator=torch.Generator().manual_seed(0))
    columns = compute_pool(dual, single, pool, k=K, projection=projection)
    v, t = torch.from_numpy(columns[IMG_EMB]), torch.from_numpy(columns[TXT_EMB])
    image_of, text_of = torch.arange(P).repeat_interleave(P), torch.arange(P).repeat(P)
    tokens = single.tokenize([s.caption for s in pool])
    fused, itm = single.match_tokens(single.encode_images([s.image for s in pool]),
                                     {name: x[text_of] for name, x in tokens.items()}, image_index=image_of)
    head = single.model.itm_head.weight.detach().float()
    return SimpleNamespace(columns=columns, projection=projection, scale=dual.logit_scale,
                           logits=dual.logit_scale * v @ t.T, itm=itm.view(P, P),
                           itm_bound=float((head[1] - head[0]).norm() * fused.norm(dim=-1).max()))


def _row_rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float((np.linalg.norm(x - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_columns_match_float32(pool, reference, dtype):
    tol = 8 * ROUNDOFF[dtype]
    dual, single = load_teachers(*DIRS, dtype=dtype)
    assert dual.dtype == single.dtype == dtype
    assert dual.logit_scale == reference.scale  # read from the weights file, not the rounded parameter
    got = compute_pool(dual, single, pool, k=K, projection=reference.projection)
    want = reference.columns

    for name in (IMG_EMB, TXT_EMB, FUSED, FUSED_PROJ):
        assert got[name].dtype == np.float32
        assert _row_rel(got[name], want[name]) <= tol, name
    logit_tol = 2 * tol * reference.scale
    at_half = candidate_columns(reference.logits, reference.itm,
                                {dr: torch.from_numpy(got[col(dr, IDX)]).long() for dr in DIRECTIONS}, start=0)
    for dr in DIRECTIONS:
        # a top-K of the float32 logits, up to near-ties the half run may order the other way
        np.testing.assert_allclose(np.sort(at_half[col(dr, DUAL)].numpy()), np.sort(want[col(dr, DUAL)]),
                                   rtol=0, atol=2 * logit_tol)
        for field, bound in ((DUAL, logit_tol), (DUAL_LSE, logit_tol), (ITM, tol * reference.itm_bound)):
            np.testing.assert_allclose(got[col(dr, field)], at_half[col(dr, field)].numpy(), rtol=0, atol=bound,
                                       err_msg=col(dr, field))
    np.testing.assert_allclose(got[ITM_POS], want[ITM_POS], rtol=0, atol=tol * reference.itm_bound)
    # the bounds are tight enough to mean something: well below the spread of what they bound
    assert logit_tol < 0.2 * np.ptp(reference.logits.numpy())
    assert tol * reference.itm_bound < 0.2 * np.ptp(reference.itm.numpy())
