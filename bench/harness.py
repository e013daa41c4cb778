"""What every benchmark shares: the device's description, the one timing helper (:func:`measure`),
the one memory helper (:class:`PeakMemory`), launching one case in a fresh process, and where
results go."""
from __future__ import annotations

import gc
import multiprocessing
import os
import platform
import re
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent  # the checkout's root, when the suite runs from one (see in_checkout)
MARK = "BENCH_RESULT "  # prefixes a worker's result line, whatever else a library prints


def in_checkout() -> bool:
    """True when the suite runs from a source checkout (``python -m bench``, or an editable
    install), False from an installed wheel (``ptcore.bench`` in site-packages)."""
    return (REPO / "csrc").is_dir() and (REPO / "bench" / "registry.py").resolve() == HERE / "registry.py"


def results_dir(device: str) -> Path:
    """The default results folder: ``bench/results/<device-slug>`` in a checkout, else
    ``./ptcore-bench-results/<device-slug>`` in the working directory."""
    root = REPO / "bench" / "results" if in_checkout() else Path.cwd() / "ptcore-bench-results"
    return root / device_slug(device)


def subprocess_cwd():
    """Where a benchmark's own subprocesses start: the checkout's root (so ``-m bench...``
    resolves), or, installed, the working directory (``-m ptcore.bench...`` resolves anyway)."""
    return REPO if in_checkout() else None


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


TIMING = {"cpu": "time.perf_counter() around each step",
          "cuda": "CUDA events around each step, the L2 cache flushed before it"}
L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (an H200 has 60 MB)


def _timer(device: str):
    """``timed(step) -> (seconds, step's value)``. On CUDA: CUDA events on the current stream, with
    the L2 cache flushed (a buffer larger than it overwritten) before each step, so a step never
    finds the previous one's data in cache, as a training step would not."""
    if device != "cuda":
        def timed(step):
            t0 = time.perf_counter()
            out = step()
            return time.perf_counter() - t0, out
        return timed
    scratch = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def timed(step):
        scratch.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    return timed


def measure(step, reset, repeats: int, device: str) -> dict:
    """One warm-up ``step()``, then ``repeats`` timed ones (:data:`TIMING`); ``reset()`` runs
    between, untimed. Returns the times (s), the extra peak memory (bytes) and the last step's
    return value.

    A step that keeps buffers across steps (allocated once, first touched in the warm-up, so
    inside the baseline) declares their size as ``step.held_bytes``; they count as extra memory."""
    timed = _timer(device)  # its L2 scratch exists before the memory baseline: not counted
    out = step()
    sync(device)
    reset()
    gc.collect()
    mem = PeakMemory(device)
    mem.reset_peak()
    times = []
    for _ in range(repeats):
        seconds, out = timed(step)
        sync(device)
        times.append(seconds)
        reset()
    value = None if out is None else float(out)
    held = getattr(step, "held_bytes", 0)
    return {"times": times, "extra_peak_bytes": mem.extra_bytes() + held, "held_bytes": held,
            "peak_scope": mem.scope, "value": value}


_SERVER = {}


def _context():
    """The forkserver every case is forked from: it imports the worker (torch, ptcore, the
    registry) and transformers' Llama once, and never runs an op, so a forked case starts with
    fresh thread pools and an uninitialized CUDA."""
    if not _SERVER:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([f"{__package__}.worker", "transformers.models.llama.modeling_llama"])
        _SERVER["ctx"] = ctx
    return _SERVER["ctx"]


def run_case(bench: str, case: str, sizes: dict, dtype: str, repeats: int, device: str,
             timeout: float) -> dict:
    """Runs one case in a fresh forked process (bench/worker.py); a case that dies or times out
    gives ``{"status": "failed: <why>"}`` rather than an exception, so the suite goes on."""
    from . import worker
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="ptcore-bench-", suffix=".log", delete=False) as f:
        log = f.name
    proc = ctx.Process(target=worker.run, args=(bench, case, sizes, dtype, repeats, device, send, log))
    proc.start()
    send.close()
    result = None
    try:
        if recv.poll(timeout):
            result = recv.recv()
    except EOFError:  # the case died before it answered
        pass
    if result is None and proc.is_alive():
        proc.kill()
        proc.join()
        result = {"status": f"failed: timed out after {timeout:.0f} s"}
    proc.join()
    if result is None:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
        if proc.exitcode is not None and proc.exitcode < 0:
            sig = signal.Signals(-proc.exitcode).name
            why = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
        else:
            why = lines[-1] if lines else f"exit code {proc.exitcode}"
        result = {"status": f"failed: {why}"}
    os.unlink(log)
    return result
