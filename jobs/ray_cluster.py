"""Connecting to Ray: a local cluster started on the spot, or an existing one.

Everything Ray-specific that is not a job lives here, so the jobs read as
"what runs where" and the library packages never see Ray.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                stall_timeout_s: float = 600.0) -> Iterator[dict]:
    """Run the body with Ray initialised; shut down only a cluster we started.

    address: None starts a local cluster (num_cpus defaults to this machine's
    count); "auto" or "ray://host:port" joins an existing one, shipping mcad's
    code with a runtime environment so workers on other nodes can import it.
    """
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, logging_level=logging.ERROR,
                      log_to_driver=False, configure_logging=True)
        if address:
            kwargs["runtime_env"] = {"py_modules": _code_modules()}
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
        started = True
    for name in ("ray", "ray.data"):  # Ray Data's plan/progress chatter; errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is a per-shard bar in the driver
    ctx.execution_no_progress_timeout_s = stall_timeout_s
    try:
        yield {"address": address or "local", "resources": ray.cluster_resources()}
    finally:
        if started:
            ray.shutdown()


def get_one_line(ref, what: str):
    """ray.get(ref); bad input the task found (InputError, OSError) is raised here as one
    InputError line starting with `what`, not as Ray's wrapper with the remote traceback."""
    import ray

    from mcad.storage.errors import InputError, error_line

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (InputError, OSError)):
            raise InputError(f"{what}: {error_line(exc.cause)}") from None
        raise


def _code_modules() -> list[str]:
    """mcad itself, shipped to a remote cluster's workers as one `mcad` package.

    Its sub-packages are folders at the top of the repository mapped into the
    `mcad` namespace at install time, so the folder to ship is assembled here:
    `mcad/` with `storage/`, `student/`, `pipeline/` and `jobs/` inside.
    """
    import shutil
    import tempfile

    import mcad
    import mcad.jobs
    import mcad.pipeline
    import mcad.storage
    import mcad.student

    staging = Path(tempfile.mkdtemp(prefix="mcad-ship-")) / "mcad"
    shutil.copytree(Path(mcad.__file__).parent, staging, ignore=shutil.ignore_patterns("__pycache__"))
    for package in (mcad.jobs, mcad.pipeline, mcad.storage, mcad.student):
        shutil.copytree(Path(package.__file__).parent, staging / package.__name__.rpartition(".")[2],
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return [str(staging)]
