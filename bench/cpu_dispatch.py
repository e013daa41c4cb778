"""The portable, dispatched CPU build against ``-march=native``, in one run: the LM-head benchmark's
linear cross-entropy (fwd+bwd, ptcore[cpu], bench/lm_head.py's default CPU size) with the default
build (ptcore._C at x86-64-v2, its hot kernels from the best variant the CPU runs: csrc/build.py)
beside the same sources built with PTCORE_CPU_ARCH=native, into a separate build folder; plus the
per-row kernel alone (cross_entropy_rows, write_grad, one logits chunk) for every variant.

    python -m bench.cpu_dispatch [--rounds 3] [--repeats 2] [--kernel-rounds 5] [--sizes N,H,V] [--native-dir DIR]

Each measurement runs in a fresh subprocess, the builds alternating (default, native, then native,
default, ...; the kernel-only processes rotate over every build), so that a busy neighbour on a
shared machine slows all alike; the table gives the median and the minimum (the least disturbed). The native module is
loaded in its process as ptcore._C from the native build folder. Target: default within 5% of native.
Writes ``cpu_dispatch.json`` (the table, every time, the variants, the scoreboard row) into the
results folder. ``--quick`` (the suite's quick profile): one round at the quick LM-head size, and only
when the native build already exists (making it compiles csrc/, which the quick profile does not wait for).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import harness, scoreboard
from .registry import Standalone

NAME = "cpu_dispatch"
TARGET = 0.05  # default within 5% of native
KERNEL_ROWS = 1024  # rows of the logits chunk the kernel-only timing uses (N x V fp32 = 128 MiB at V=32768)


def _builder():
    spec = importlib.util.spec_from_file_location("ptcore_csrc_build", harness.REPO / "csrc" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def default_native_dir() -> Path:
    return harness.REPO / "build" / "ptcore-native"


def build_native(build_dir: Path) -> Path:
    """ptcore._C built with -march=native into ``build_dir`` (ninja: a rebuild only for changed sources)."""
    built = _builder().build(build_dir, cuda=False, arch="native")
    return built["_C"]


def _load_native(path: str) -> None:
    """Makes ``path`` (a -march=native _C) the ptcore._C of this process, before ptcore loads its own."""
    spec = importlib.util.spec_from_file_location("ptcore._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["ptcore._C"] = mod


def _worker(build: str, native_so: str, sizes: dict, repeats: int, full: bool) -> dict:
    """In the subprocess: the CPU module in use, then the timings."""
    if build == "native":
        _load_native(native_so)
    import torch

    from . import linear_ce
    from ptcore import _ext
    from ptcore.ops.rows import CROSS_ENTROPY_ROWS

    mod = _ext.cpu_module()
    choice = _ext.cpu_variant()
    out = {"build": build, "isa": choice["isa"], "module": choice["module"], "why": choice["why"],
           "module_file": mod.__file__, "build_arch": getattr(mod, "build_arch", "?"),
           "threads": torch.get_num_threads()}
    if build == "native":
        assert getattr(mod, "build_arch", None) == "native", out
    # The kernel alone: one chunk of logits through the fused per-row pass, gradient written.
    torch.manual_seed(0)
    V = sizes["V"]
    z0 = torch.randn(KERNEL_ROWS, V)
    t = torch.randint(0, V, (KERNEL_ROWS,))
    z, loss, lse = z0.clone(), torch.empty(KERNEL_ROWS), torch.empty(KERNEL_ROWS)
    opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, write_grad=True)
    times = []
    for i in range(1 + 20):
        z.copy_(z0)
        t0 = time.perf_counter()
        CROSS_ENTROPY_ROWS["cpu"](z, t, loss, lse, None, **opts)
        if i:
            times.append(time.perf_counter() - t0)
    out["kernel_times"] = times
    out["kernel_loss"] = float(loss.mean())
    del z0, z
    if full:  # the LM-head benchmark's step (bench/linear_ce.py), as the suite runs it
        torch.manual_seed(0)
        step, reset = linear_ce.build("ptcore[cpu]", sizes, torch.float32, "cpu")
        res = harness.measure(step, reset, repeats, "cpu")
        out["step_times"] = res["times"]
        out["loss"] = res["value"]
    return out


def _run_worker(build: str, native_so: Path, sizes: dict, repeats: int, full: bool, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PTCORE_CPU_ISA", "PTCORE_BACKEND")}
    if build in ("v2", "v3", "v4"):
        env["PTCORE_CPU_ISA"] = build
    cmd = [sys.executable, "-m", f"{__package__}.cpu_dispatch", "--worker", build, "--native-so", str(native_so),
           "--sizes", ",".join(str(sizes[k]) for k in ("N", "H", "V")), "--repeats", str(repeats)] + \
          ([] if full else ["--kernel-only"])
    p = subprocess.run(cmd, cwd=harness.subprocess_cwd(), env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(harness.MARK):
            return json.loads(line[len(harness.MARK):])
    tail = "\n".join(p.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"worker {build} failed (exit {p.returncode}):\n{tail}")


def run(sizes: dict, rounds: int, repeats: int, native_dir: Path, kernel_rounds: int = 5,
        timeout: float = 1800) -> dict:
    t0 = time.perf_counter()
    native_so = build_native(native_dir)
    build_s = time.perf_counter() - t0
    import ptcore._C as C
    variants = [v for v in ("v2", "v3", "v4") if importlib.util.find_spec(f"ptcore._C_{v}" if v != "v2" else "ptcore._C")
                and getattr(C, "isa", None) == "v2" and C.cpu_isa_levels().get(v)]
    samples: dict[str, list[dict]] = {}
    for r in range(rounds):  # the whole step: default and native, alternating
        for build in (["default", "native"] if r % 2 == 0 else ["native", "default"]):
            print(f"step round {r + 1}/{rounds}: {build}", file=sys.stderr, flush=True)
            samples.setdefault(build, []).append(_run_worker(build, native_so, sizes, repeats, True, timeout))
    builds = ["default", "native"] + variants
    for r in range(kernel_rounds):  # the kernel alone (seconds per process): every build, rotating
        for build in builds[r % len(builds):] + builds[:r % len(builds)]:
            print(f"kernel round {r + 1}/{kernel_rounds}: {build}", file=sys.stderr, flush=True)
            samples.setdefault(build, []).append(_run_worker(build, native_so, sizes, repeats, False, timeout))
    rows = []
    for build, recs in samples.items():
        first = recs[0]
        step = [s for rec in recs for s in rec.get("step_times", [])]
        kern = [s for rec in recs for s in rec["kernel_times"]]
        label = {"default": "default (dispatched)", "native": "PTCORE_CPU_ARCH=native"}.get(build, f"PTCORE_CPU_ISA={build}")
        rows.append({"build": build, "label": label, "isa": first["isa"], "module": first["module"],
                     "build_arch": first["build_arch"], "why": first["why"], "threads": first["threads"],
                     "step_times": step, "step_median_s": statistics.median(step) if step else None,
                     "step_min_s": min(step) if step else None,
                     "kernel_times": kern, "kernel_median_ms": 1e3 * statistics.median(kern),
                     "kernel_min_ms": 1e3 * min(kern),
                     "loss": first.get("loss"), "kernel_loss": first["kernel_loss"]})
    nat = next(r for r in rows if r["build"] == "native")
    for r in rows:
        r["step_ratio"] = r["step_median_s"] / nat["step_median_s"] if r["step_median_s"] else None
        r["step_min_ratio"] = r["step_min_s"] / nat["step_min_s"] if r["step_min_s"] else None
        r["kernel_ratio"] = r["kernel_median_ms"] / nat["kernel_median_ms"]
        r["kernel_min_ratio"] = r["kernel_min_ms"] / nat["kernel_min_ms"]
    default = next(r for r in rows if r["build"] == "default")
    return {"benchmark": NAME, "device": harness.device_name("cpu"), "sizes": sizes, "dtype": "float32",
            "kernel_rows": KERNEL_ROWS, "rounds": rounds, "repeats_per_round": repeats, "kernel_rounds": kernel_rounds,
            "native_build_s": build_s, "native_so": str(native_so), "target": f"default within {TARGET:.0%} of native",
            "met": default["step_ratio"] <= 1 + TARGET, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": default["threads"], "rows": rows}


def table(res: dict) -> str:
    s = res["sizes"]
    head = ["build", "CPU module (-march)", "fwd+bwd median s", "/ native", "fwd+bwd min s", "/ native",
            f"kernel median ms ({res['kernel_rows']}x{s['V']})", "/ native", "kernel min ms", "/ native"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"linear cross-entropy fwd+bwd, ptcore[cpu], default build vs -march=native: N={s['N']} H={s['H']} "
             f"V={s['V']} float32 | {res['device']} | {res['threads']} threads | median of "
             f"{res['rounds']}x{res['repeats_per_round']} steps in alternating processes; kernel: cross_entropy_rows "
             f"with the gradient, 20 per process in {res['rounds']} + {res['kernel_rounds']} rotating processes",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in res["rows"]:
        lines.append("| " + " | ".join([r["label"], f"{r['module']} ({r['build_arch']})", fmt(r["step_median_s"], ".3f"),
                                         fmt(r["step_ratio"], ".3f"), fmt(r["step_min_s"], ".3f"),
                                         fmt(r["step_min_ratio"], ".3f"), fmt(r["kernel_median_ms"], ".2f"),
                                         fmt(r["kernel_ratio"], ".2f"), fmt(r["kernel_min_ms"], ".2f"),
                                         fmt(r["kernel_min_ratio"], ".2f")]) + " |")
    d = next(r for r in res["rows"] if r["build"] == "default")
    lines.append(f"\ndefault / native, fwd+bwd: {d['step_ratio']:.3f} median, {d['step_min_ratio']:.3f} min (target <= {1 + TARGET:.2f}: "
                 f"{'met' if res['met'] else 'NOT met'}); default chose {d['isa']}: {d['why']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_dispatch", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating processes per build (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="timed fwd+bwd steps per process (default 2)")
    p.add_argument("--kernel-rounds", type=int, default=5, help="rotating kernel-only processes per build (default 5)")
    p.add_argument("--sizes", help="N,H,V (default: bench/lm_head.py's CPU size)")
    p.add_argument("--native-dir", type=Path, default=None, help="the native build folder (default build/ptcore-native)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<device-slug>)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--native-so", help=argparse.SUPPRESS)
    p.add_argument("--kernel-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="one round at the quick size, if the native build exists")
    args = p.parse_args(argv)
    from .lm_head import DEFAULT_SIZES, QUICK_SIZES
    sizes = dict((QUICK_SIZES if args.quick else DEFAULT_SIZES)["cpu"])
    if args.sizes:
        sizes = dict(zip(("N", "H", "V"), (int(v) for v in args.sizes.split(","))))
    if args.worker:
        res = _worker(args.worker, args.native_so, sizes, args.repeats, not args.kernel_only)
        print(harness.MARK + json.dumps(res), flush=True)
        return 0
    out = args.out or harness.results_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    native_dir = args.native_dir or default_native_dir()
    if args.quick:
        if not list(native_dir.glob("_C*.so")):
            why = f"skipped in the quick profile: no native build in {native_dir} (--only cpu_dispatch makes it)"
            print(f"{NAME}: {why}")
            (out / f"{NAME}.json").write_text(json.dumps({"scoreboard": [scoreboard.failed_row(NAME, why)]}) + "\n")
            return 0
        args.rounds, args.kernel_rounds = 1, 2
    res = run(sizes, args.rounds, args.repeats, native_dir, args.kernel_rounds)
    d, n = (next(r for r in res["rows"] if r["build"] == b) for b in ("default", "native"))
    res["scoreboard"] = [scoreboard.row(NAME, "default build vs native, fwd+bwd", 1 / d["step_median_s"],
                                        "PTCORE_CPU_ARCH=native", 1 / n["step_median_s"], unit=" steps/s",
                                        target=(">=", 1 / (1 + TARGET)))]
    print(table(res))
    default = not args.sizes or args.quick or sizes == DEFAULT_SIZES["cpu"]
    stem = NAME if default else f"{NAME}-N{sizes['N']}-H{sizes['H']}-V{sizes['V']}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / stem}.json")
    return 0


BENCHMARK = Standalone(NAME, "the portable build vs -march=native", main, needs_checkout=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
