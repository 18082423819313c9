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


def node_resources() -> list[dict]:
    """The total resources of each alive node ({"CPU": 4.0, "GPU": 1.0, ...}), as Ray reports them."""
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def copies_that_fit(nodes: list[dict], request: dict) -> int:
    """How many copies of `request` ({"CPU": 1, "GPU": 0.5}) the nodes hold at once, each copy
    on one node (a Ray task, actor or placement bundle never spans nodes)."""
    wanted = {k: float(v) for k, v in request.items() if v}
    if not wanted:
        return 10**9
    # A little slack: Ray keeps resources in fixed point, 0.1 * 3 is 0.3 there.
    return sum(min(int(node.get(k, 0.0) / v + 1e-9) for k, v in wanted.items()) for node in nodes)


def share_that_fits(nodes: list[dict], resource: str, copies: int) -> float:
    """The largest amount of `resource` per copy such that `copies` copies fit on the nodes at
    once (each on one node); 0.0 when no node has any."""
    amounts = [float(node.get(resource, 0.0)) for node in nodes]
    candidates = {a / k for a in amounts if a > 0 for k in range(1, copies + 1)}
    return max((c for c in candidates if copies_that_fit(nodes, {resource: c}) >= copies), default=0.0)


def refusal(nodes: list[dict], request: dict, what: str, *, copies: int = 1) -> str | None:
    """Why `copies` of `request` can never run on these nodes at once, as one line; None if they can.

    `what` names one copy ("sweep trial"); the line says what each asks and what
    the largest node has, e.g. "each sweep trial asks 2 CPUs; the largest node has 1 (2 nodes)".
    """
    count = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    for key, amount in request.items():
        if not amount:
            continue
        largest = max((float(node.get(key, 0.0)) for node in nodes), default=0.0)
        if copies_that_fit(nodes, {key: amount}) < 1:
            return f"each {what} asks {_amount(amount, key)}; the largest node has {largest:g} ({count})"
    held = copies_that_fit(nodes, request)
    if held < copies:
        asked = ", ".join(_amount(v, k) for k, v in request.items() if v)
        biggest = max(nodes, key=lambda node: copies_that_fit([node], request))
        return (f"{copies} {what}s ask {asked} each and must run at once; the nodes hold {held} "
                f"({count}, the largest with {_node_text(biggest, request)})")
    return None


def require_fit(request: dict, what: str, *, copies: int = 1, nodes: list[dict] | None = None) -> list[dict]:
    """Refuse at once (InputError, one line) what no node of the cluster can hold; return the nodes."""
    from mcad.storage.errors import InputError

    nodes = node_resources() if nodes is None else nodes
    reason = refusal(nodes, request, what, copies=copies)
    if reason:
        raise InputError(reason)
    return nodes


def wait_for_room(bundles: list[dict], what: str, timeout_s: float) -> None:
    """Reserve `bundles` (a placement group, packed where possible) and release them: a job about to
    ask for them can be placed now. Not within `timeout_s`: one line (InputError), not a silent wait."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from mcad.storage.errors import InputError

    group = placement_group(bundles, strategy="PACK")
    try:
        ready = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    if not ready:
        free = ray.available_resources()
        asked = ", ".join(_amount(v, k) for k, v in bundles[0].items() if v)
        raise InputError(f"{what} could not be placed within the stall timeout ({timeout_s:g} s): "
                         f"{len(bundles)} x {asked} asked, {_node_text(free, bundles[0])} free in the "
                         f"cluster (other jobs may hold the rest)")


def _amount(amount: float, key: str) -> str:
    unit = {"CPU": "CPU", "GPU": "GPU"}.get(key, key)
    return f"{float(amount):g} {unit}{'' if float(amount) == 1 else 's'}"


def _node_text(node: dict, request: dict) -> str:
    return ", ".join(_amount(node.get(k, 0.0), k) for k, v in request.items() if v)


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
