"""Peak resident memory per stage of a run, read from the kernel's high-water mark (Linux), resettable between
stages by writing 5 to /proc/self/clear_refs; and glibc's allocator told to give freed memory back.

Without that, glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which tensors
of a few MiB come from heaps that fragment: a demo that computes and frees many model-sized tensors then stays
hundreds of MiB above what it holds (measured: 1258 MiB resident after the Fisher files, 721 MiB after a trim)."""

from __future__ import annotations

import functools
import gc
import re
import time
from contextlib import contextmanager
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str):
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak() -> bool:
    """Resets the high-water mark to the current resident size; False where the system does not allow it (the
    peak then stays the process's peak so far)."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_mib():
    """The peak resident memory (MiB) since the last reset_peak() (or the process's start); None off Linux,
    where only the process-wide peak of resource.getrusage is known."""
    kib = _status_kib("VmHWM")
    if kib is None:
        try:
            import resource
            import sys
            scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB elsewhere
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        except (ImportError, OSError):
            return None
    return kib / 1024


M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter


@functools.lru_cache(maxsize=None)
def _glibc():
    import ctypes
    import ctypes.util
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "mallopt") and hasattr(library, "malloc_trim") else None


def release_freed_memory(threshold: int = 1 << 20) -> bool:
    """Blocks of `threshold` bytes or more get their own mappings, returned to the system when freed (a fixed
    threshold: glibc no longer raises it). For the whole process; False where the allocator is not glibc's."""
    library = _glibc()
    return bool(library and library.mallopt(M_MMAP_THRESHOLD, threshold))


def trim() -> None:
    """Returns the free memory of glibc's heaps to the system (no-op elsewhere)."""
    library = _glibc()
    if library is not None:
        library.malloc_trim(0)


def _larger(a, b):
    return b if a is None else a if b is None else max(a, b)


class Stages:
    """Seconds and peak resident memory (MiB) of each named stage of a run: `with stages("name"): ...`; within a
    stage, lap() gives the peak of a part of it (the stage's peak still covers every part)."""

    def __init__(self, log=print, prefix: str = ""):
        self.log, self.prefix = log, prefix
        self.seconds: dict = {}
        self.peaks: dict = {}
        self._stage_peak = None   # the stage's peak over its laps so far

    def lap(self):
        """The peak resident memory since the stage began or the last lap, and a fresh start for the next."""
        peak = peak_mib()
        self._stage_peak = _larger(self._stage_peak, peak)
        reset_peak()
        return peak

    @contextmanager
    def __call__(self, name: str):
        self.log(f"{self.prefix}{name} ...")
        gc.collect()     # what the last stage dropped (in reference cycles, or freed to the heaps) is not this stage's
        trim()
        reset_peak()
        self._stage_peak = None
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.peaks[name] = _larger(self._stage_peak, peak_mib())
            peak = "" if self.peaks[name] is None else f", peak {self.peaks[name]:.0f} MiB resident"
            self.log(f"{self.prefix}{name}: {self.seconds[name]:.0f} s{peak}")

    def peak(self):
        """The largest stage peak: the run's peak since its first stage began."""
        known = [p for p in self.peaks.values() if p is not None]
        return max(known) if known else None
