"""How much model memory this node can offer: GPU memory through NVML, else system RAM.

``--max-vram`` caps what is advertised; it takes sizes like ``24``, ``24GB``, ``512MB`` or ``8MB``
(a bare number means GB), so tests can force small capacities. NVML sees every GPU of the machine;
only those ``CUDA_VISIBLE_DEVICES`` leaves to this node's engines are counted (a node pinned to one
GPU of several offers that GPU's memory).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Capacity", "detect_capacity", "parse_size", "visible_gpus"]

_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in ``text`` (e.g. ``24``, ``24GB``, ``512MiB``); a bare number is GB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 24, 24GB, 512MB)")
    return int(float(match[1]) * _UNITS[unit])


@dataclass(frozen=True)
class Capacity:
    bytes: int
    gpu: bool
    description: str


def visible_gpus(setting: str | None, count: int) -> list[int | str]:
    """The GPUs CUDA lets this process use, as NVML indices or UUIDs: all ``count`` when
    ``CUDA_VISIBLE_DEVICES`` is unset, else its list up to the first invalid entry (as CUDA reads it;
    an empty or ``-1`` setting hides every GPU)."""
    if setting is None:
        return list(range(count))
    visible: list[int | str] = []
    for entry in (part.strip() for part in setting.split(",")):
        if entry.isdigit() and int(entry) < count:
            visible.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            visible.append(entry)
        else:
            break  # CUDA ignores this entry and every one after it
    return visible


def _gpu_memory() -> tuple[int, str] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handles = []
        for gpu in visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), pynvml.nvmlDeviceGetCount()):
            try:
                handles.append(pynvml.nvmlDeviceGetHandleByIndex(gpu) if isinstance(gpu, int)
                               else pynvml.nvmlDeviceGetHandleByUUID(gpu))
            except pynvml.NVMLError:
                break  # an entry CUDA cannot use either
        if not handles:
            return None
        count = len(handles)
        total = sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).total) for h in handles)
        name = pynvml.nvmlDeviceGetName(handles[0])
        return total, f"{count}× {name if isinstance(name, str) else name.decode()}"
    finally:
        pynvml.nvmlShutdown()


def _ram() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def detect_capacity(*, max_vram: int | None = None) -> Capacity:
    gpu = _gpu_memory()
    total, desc, is_gpu = (gpu[0], gpu[1], True) if gpu else (_ram(), "CPU (system RAM)", False)
    if max_vram is not None:
        total = min(total, max_vram) if total else max_vram
    return Capacity(bytes=total, gpu=is_gpu, description=desc)
