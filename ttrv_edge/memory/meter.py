"""Measuring memory: the device's peak per phase, the bytes a tensor holds, out-of-memory errors.

``PeakMeter`` resets the device's peak before a phase and reads it after: ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the process's peak RSS (VmHWM), which Linux lets a process reset through /proc/self/clear_refs, or
``resource.getrusage`` where that is missing, which only ever grows. The CUDA context (~0.3-0.5 GB outside
``max_memory_allocated``) is not counted, matching how the GPU target is measured.
"""

from __future__ import annotations

import gc
import resource
import sys

import torch

__all__ = ["PeakMeter", "free_memory", "is_out_of_memory", "tensor_bytes"]


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text.lower() or isinstance(error, MemoryError)
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes held by a tensor, looking inside quantized tensor subclasses (optimum-quanto's data + scales)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


class PeakMeter:
    """The peak memory of the device a model runs on, resettable per phase.

    CUDA: bytes allocated by tensors (``max_memory_allocated``). CPU: the process's resident set (VmHWM, reset by
    writing "5" to /proc/self/clear_refs; where that is impossible, ``getrusage`` peak RSS, which never decreases).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.resettable = self.device.type == "cuda" or self._can_clear_refs()

    @staticmethod
    def _can_clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return _proc_status("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        rss = _proc_status("VmRSS")
        return rss if rss is not None else self.peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status("VmHWM")
        if hwm is not None:
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
