"""A description of the machine that ran a profile: it becomes the reference device.

Everything comes from psutil (cores, memory), torch (threads, CPU capability, GPU) and
:mod:`platform` (host, OS, processor).
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from typing import Any

__all__ = ["system_info", "device_description"]


def _cpu_model(capability: str) -> str:
    """The processor as the standard library names it, with the vector ISA torch's kernels use.

    ``platform.processor()`` is the brand string on macOS and Windows and often empty on Linux,
    where the architecture stands in (``x86_64 (AVX512)``); nothing here parses ``/proc/cpuinfo``.
    """
    name = platform.processor() or platform.machine() or "unknown cpu"
    return f"{name} ({capability})" if capability and capability not in ("DEFAULT", "NO AVX") else name


def system_info(device: Any = None) -> dict[str, Any]:
    """CPU, memory, library versions and GPU (if any) of this machine, as JSON-ready data."""
    import psutil
    import torch
    import transformers

    vm = psutil.virtual_memory()
    capability = torch.backends.cpu.get_cpu_capability()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": {
            "model": _cpu_model(capability),
            "capability": capability,
            "logical_cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False),
            "usable_cores": affinity,
            "torch_threads": torch.get_num_threads(),
        },
        "memory": {"total_bytes": int(vm.total), "available_bytes": int(vm.available)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "gpu": None,
        "device": str(device) if device is not None else "cpu",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return info


def device_description(info: dict[str, Any]) -> str:
    """One line naming the profiled device, e.g. ``cpu: Intel Xeon ... (2 threads)``."""
    if str(info.get("device", "cpu")).startswith("cuda") and info.get("gpu"):
        return f"cuda: {info['gpu']['name']}"
    cpu = info["cpu"]
    return f"cpu: {cpu['model']} ({cpu['torch_threads']} torch threads, {cpu['usable_cores']} usable cores)"
