"""Timing, memory and machine description shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(functions: dict, device: torch.device, repeats: int, warmup: int = 2,
                     settle: bool = False) -> dict:
    """Median milliseconds of each function, the candidates interleaved round by round so that a slow spell of a
    shared machine hits them all alike. settle: each timed call right after an untimed call of the same function,
    so that every candidate finds its own data in cache, never what the candidate before it left (a kernel timed
    after its reference would start cold, and the next candidate would find the kernel's rows warm). CUDA: device
    events; CPU: perf_counter."""
    for f in functions.values():
        for _ in range(warmup):
            f()
    synchronize(device)
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, f in functions.items():
            if settle:
                f()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                f()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_extra_bytes_in_subprocess(script: Path, args: list) -> int:
    """Runs `script --memory-probe ARGS` in a fresh process (no allocator caches or grown scratch buffers from
    earlier calls) and reads the number it prints: peak resident bytes of one call beyond what was resident
    before it."""
    out = subprocess.run([sys.executable, str(script), "--memory-probe", *map(str, args)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def resident_peak_reset() -> int:
    """Resets the kernel's peak-RSS mark (Linux) and returns the current resident bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def resident_peak() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def save(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(f"saved {RESULTS / name}.json and .md")


def slug(name: str) -> str:
    """A file name from a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def markdown_table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
