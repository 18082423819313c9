"""What every bench records about the machine it ran on, so its figures can be compared."""
from __future__ import annotations

import os
import platform
import sys


def machine_info(**extra) -> dict:
    """CPUs, platform, versions, torch threads, load and the OpenMP settings, plus `extra`."""
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
            # libgomp's spin-waiting decides 2-thread speed on a shared machine: record it.
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}}
    if "ray" in sys.modules:
        info["ray"] = sys.modules["ray"].__version__
    return {**info, **extra}
