"""Fixtures for the jobs: one local Ray cluster per test session, tiny data and teachers."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray cluster, started once for the session (ray_session reuses it)."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_TMPDIR"] = str(tmp)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp))
    yield ray
    ray.shutdown()


@pytest.fixture
def cpus_held(ray_local):
    """Every CPU of the session's local cluster held by an idle actor, as another job would hold them."""
    @ray_local.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray_local.get(holder.ready.remote(), timeout=120)
    yield
    ray_local.kill(holder)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """The shapes benchmark at toy size: train in 3 shards of 20 samples."""
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark

    out = tmp_path_factory.mktemp("shapes")
    write_benchmark(SynthConfig(train=60, val=10, test=10, shard_size=20, seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory, shapes_data):
    """Untrained smoke-size CLIP and BLIP-ITM directories (real HF classes, random weights)."""
    import json

    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    captions = json.loads((shapes_data / "synth_config.json").read_text())["vocabulary"]
    dual, single = make_tiny_teachers(tmp_path_factory.mktemp("teachers"), [" ".join(captions)])
    return str(dual), str(single)


@pytest.fixture(scope="session")
def teachers_dir(tiny_teachers, tmp_path_factory):
    """The tiny teachers as a teachers folder (dual/, single/), as the demo and benches take them."""
    folder = tmp_path_factory.mktemp("teachers_dir")
    for name, path in zip(("dual", "single"), tiny_teachers):
        (folder / name).symlink_to(path)
    return folder


@pytest.fixture(scope="session")
def tiny_pass() -> dict:
    """Teacher-pass settings of the toy store: pools of 8, 3 candidates."""
    return dict(pool_size=8, topk=3, pair_batch=16, calibration_rows=24)


@pytest.fixture(scope="session")
def tiny_store(ray_local, shapes_data, tiny_teachers, tiny_pass, tmp_path_factory):
    """A real signal store: the teacher pass over the toy train split (3 shards x 20 samples)."""
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    dual, single = tiny_teachers
    out = tmp_path_factory.mktemp("store")
    run_teacher_pass(TeacherPassJob(data=str(shapes_data / "train"), dual=dual, single=single,
                                    out=str(out), **tiny_pass), progress=False)
    return out


@pytest.fixture(scope="session")
def two_shards(shapes_data, tmp_path_factory):
    """The toy train split's first two shards (links), for passes that must cover more than one shard."""
    folder = tmp_path_factory.mktemp("two_shards")
    for name in ("000000", "000001"):
        (folder / f"{name}.tar").symlink_to(shapes_data / "train" / f"{name}.tar")
    return folder


@pytest.fixture(scope="session")
def pass_job(two_shards, tiny_teachers, tiny_pass):
    """pass_job(out, **settings): a TeacherPassJob over two_shards with the toy teachers and pass."""
    from mcad.jobs.teacher_pass import TeacherPassJob

    def make(out, **settings):
        return TeacherPassJob(data=str(two_shards), dual=tiny_teachers[0], single=tiny_teachers[1], out=str(out),
                              **{**tiny_pass, **settings})
    return make
