"""What every bench records about the machine it ran on, so its figures can be compared;
the accelerators' peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import os
import platform
import sys

# Dense peak FLOP/s (no 2:4 sparsity) per accelerator and compute dtype, from the vendors' datasheets.
# float32 is the non-tensor-core rate: torch's float32 matmuls do not use TF32 unless asked.
# Keys are `accelerator_key(torch.cuda.get_device_name())`; a missing entry is unknown ("n/a").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},        # SXM
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},        # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},      # SXM4
    "A100 PCIe": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 31.2e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},                          # SXM2; no bfloat16
    "V100 PCIe": {"float16": 112e12, "float32": 14e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
}
_VENDOR_WORDS = {"nvidia", "tesla"}


def accelerator_key(device_name: str) -> str:
    """The PEAK_FLOPS key of a device name as torch.cuda.get_device_name gives it: the model word,
    plus " PCIe" / " NVL" for those variants ("NVIDIA A100-SXM4-80GB" -> "A100",
    "NVIDIA H100 PCIe" -> "H100 PCIe", "Tesla V100-PCIE-16GB" -> "V100 PCIe")."""
    words = [w for w in device_name.replace("-", " ").split() if w.lower() not in _VENDOR_WORDS]
    if not words:
        return ""
    rest = {w.lower() for w in words[1:]}
    return words[0] + (" PCIe" if "pcie" in rest else "") + (" NVL" if "nvl" in rest else "")


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """Dense peak FLOP/s of a CUDA device for `dtype` ("bfloat16", "float16", "float32");
    None when unknown, and always for the CPU (device_name None): pass a peak to the bench instead."""
    if not device_name:
        return None
    return PEAK_FLOPS.get(accelerator_key(device_name), {}).get(dtype)


def accelerator_name() -> str | None:
    """torch.cuda.get_device_name() of the current CUDA device; None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def machine_info(**extra) -> dict:
    """CPUs, platform, versions, torch threads, load, the OpenMP settings and the CUDA device, plus `extra`."""
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
            # libgomp's spin-waiting decides 2-thread speed on a shared machine: record it.
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")},
            "accelerator": accelerator_name()}
    if "ray" in sys.modules:
        info["ray"] = sys.modules["ray"].__version__
    return {**info, **extra}
