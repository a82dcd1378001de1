"""How much model memory this node can offer: GPU memory through NVML, else system RAM.

``--max-vram`` caps what is advertised; it takes sizes like ``24``, ``24GB``, ``512MB`` or ``8MB``
(a bare number means GB), so tests can force small capacities. NVML sees every GPU of the machine;
only those ``CUDA_VISIBLE_DEVICES`` leaves to this node's engines are counted (a node pinned to one
GPU of several offers that GPU's memory).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
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
    devices: tuple[tuple[str, int], ...] = ()  # each GPU llama-server may use: (name, memory bytes)


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


def _gpu_memory() -> list[tuple[str, int]] | None:
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
        devices = []
        for handle in handles:
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append((name if isinstance(name, str) else name.decode(),
                            int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return devices
    finally:
        pynvml.nvmlShutdown()


def _ram() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def detect_capacity(*, max_vram: int | None = None,
                    gpus: Callable[[], list[tuple[str, int]] | None] = _gpu_memory) -> Capacity:
    """What this machine offers: its GPUs' memory (each GPU CUDA lets it use), else its RAM; at most
    ``max_vram``, taken from each GPU in proportion to its memory (as llama-server spreads layers)."""
    devices = gpus() or []
    total = sum(size for _, size in devices) if devices else _ram()
    desc = f"{len(devices)}× {devices[0][0]}" if devices else "CPU (system RAM)"
    if max_vram is not None and total and max_vram < total:
        devices = [(name, size * max_vram // total) for name, size in devices]
        total = max_vram
    elif max_vram is not None and not total:
        total = max_vram
    return Capacity(bytes=total, gpu=bool(devices), description=desc, devices=tuple(devices))
