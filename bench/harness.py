"""What every benchmark shares: the device's description, the one timing helper (:func:`measure`),
the one memory helper (:class:`PeakMemory`), and launching one case in a fresh subprocess."""
from __future__ import annotations

import gc
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "  # prefixes the worker's result line, whatever else a library prints


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{_cpu_model()}, {os.cpu_count()} cores"


def device_slug(device: str) -> str:
    """e.g. ``cpu-intel-xeon-processor-2c`` or ``nvidia-h200``: names the results folder."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu {_cpu_model()} {os.cpu_count()}c"
    name = re.sub(r"\((r|tm)\)", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def available_bytes(device: str) -> int:
    return torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Extra peak memory over a baseline taken at construction: by :func:`measure`, after the
    warm-up step with its gradients dropped, so one-time library state (thread pools, BLAS
    buffers, compiled code) is not billed to the op: what is measured is what a training step
    adds on top of the inputs.

    CPU: peak RSS (``ru_maxrss``; KiB on Linux, bytes on macOS) minus the RSS (psutil) then; the
    process is fresh, so nothing but this case counts. CUDA: ``max_memory_allocated`` minus
    ``memory_allocated`` then (the caching allocator's view, its cache excluded).
    """

    def __init__(self, device: str):
        self.device = device
        self.scope = "warm-up and timed runs"
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = psutil.Process().memory_info().rss

    def reset_peak(self) -> None:
        """Forget the peak so far (the warm-up's one-off costs: torch.compile, autotuning), so the
        peak is that of steady-state steps. On CPU, Linux's clear_refs resets the peak RSS to the
        current RSS; where it cannot, the warm-up stays counted (``scope`` says which)."""
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                return
        self.scope = "timed runs"

    def extra_bytes(self) -> int:
        sync(self.device)
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        unit = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - self.base


def measure(step, reset, repeats: int, device: str) -> dict:
    """One warm-up ``step()``, then ``repeats`` timed ones; ``reset()`` runs between, untimed.
    Returns the times (s), the extra peak memory (bytes) and the last step's return value.

    A step that keeps buffers across steps (allocated once, first touched in the warm-up, so
    inside the baseline) declares their size as ``step.held_bytes``; they count as extra memory."""
    out = step()
    sync(device)
    reset()
    gc.collect()
    mem = PeakMemory(device)
    mem.reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        sync(device)
        times.append(time.perf_counter() - t0)
        reset()
    value = None if out is None else float(out)
    held = getattr(step, "held_bytes", 0)
    return {"times": times, "extra_peak_bytes": mem.extra_bytes() + held, "held_bytes": held,
            "peak_scope": mem.scope, "value": value}


def run_case(bench: str, case: str, sizes: dict, dtype: str, repeats: int, device: str,
             timeout: float) -> dict:
    """Runs one case in a fresh ``python -m bench.worker``; a worker that dies or times out gives
    ``{"status": "failed: <why>"}`` rather than an exception, so the suite goes on."""
    cmd = [sys.executable, "-m", "bench.worker", bench, case, json.dumps(sizes), dtype, str(repeats), device]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        why = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
    else:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {p.returncode}"
    return {"status": f"failed: {why}"}
