"""What a measurement ran on: every benchmark summary records it beside its figures."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU model, cores, torch version and threads, and the GPU when ``device`` is a CUDA device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "step_device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
