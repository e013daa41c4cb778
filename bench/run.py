"""The suite runner: ``ptcore bench`` (or ``python -m bench`` in a checkout) runs the quick profile
of every benchmark (about five minutes on a 2-core CPU) and ends with the scoreboard; ``--full``
runs every case at the full sizes (today's complete tables).

For each benchmark of the registry (bench/registry.py), in order: a shared-runner one runs its
cases one forked process each (skipping those that cannot run here or would not fit in memory),
prints the plain and markdown tables, and writes ``<out>/<name>[-<sizes>].json`` and ``.png``; a
standalone one runs its own ``main``. A benchmark that fails has its row say so, and the suite goes
on. At the end: the scoreboard (bench/scoreboard.py), also written as ``scoreboard.md`` and
``scoreboard.json`` with the machine, the versions and the git commit; ``--compare DIR`` marks every
figure that moved by more than the run-to-run noise since the run in DIR.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

import ptcore

from . import harness, registry, report, scoreboard
from .registry import Benchmark

MEMORY = {"cpu": "peak RSS over the RSS after making the inputs",
          "cuda": "CUDA allocator peak over the allocated memory after making the inputs"}
VERSIONS = ("torch", "transformers", "trl", "triton", "liger-kernel", "cut-cross-entropy", "numpy")


def _parse(argv):
    p = argparse.ArgumentParser(prog="ptcore bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(registry.REGISTRY), metavar="NAME",
                   help=f"run only this benchmark: one of {', '.join(registry.REGISTRY)}")
    p.add_argument("--full", action="store_true", help="the full profile: every case at the full sizes")
    p.add_argument("--sizes", help="one size, comma-separated in the benchmark's order (N,H,V); with --only")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, help="timed runs per case (default: the benchmark's, per profile)")
    p.add_argument("--large", action="store_true", help="also run the benchmark's large size")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, help="results folder (default: bench/results/<device-slug> in a "
                                            "checkout, else ./ptcore-bench-results/<device-slug>)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case (default 1800)")
    p.add_argument("--compare", type=Path, metavar="PREVIOUS_DIR",
                   help="mark the figures that moved by more than the noise since that run")
    p.add_argument("--noise", type=Path, nargs="+", metavar="RUN_DIR",
                   help="measure the run-to-run spread of every scoreboard figure over these results "
                        "folders (repeated runs of one profile), write it to bench/noise.json, and stop")
    args = p.parse_args(argv)
    if args.sizes and not args.only:
        p.error("--sizes needs --only NAME (sizes are per benchmark)")
    return args


def _derive(records, flops, baseline, ref):
    """Adds median, the work rate (GFLOP/s, or units/s for a benchmark with its own unit), the
    fraction of the baseline's rate and the ratios to ptcore's default."""
    by = {r["name"]: r for r in records}
    for r in records:
        if r["status"] == "ok":
            r["median_s"] = statistics.median(r["times"])
            r["rate"] = flops / r["median_s"]
            r["gflops"] = r["rate"] / 1e9
            r["extra_peak_mb"] = r["extra_peak_bytes"] / 1e6
    base, pt = by.get(baseline, {}), by.get(ref, {})
    for r in records:
        if r["status"] != "ok":
            continue
        if base.get("status") == "ok":
            r["frac_of_gemm"] = r["gflops"] / base["gflops"]
        if pt.get("status") == "ok":
            r["time_ratio"] = r["median_s"] / pt["median_s"]
            r["mem_ratio"] = r["extra_peak_mb"] / pt["extra_peak_mb"] if pt["extra_peak_mb"] > 0 else None
            if r.get("value") is not None and pt.get("value") is not None \
                    and abs(r["value"] - pt["value"]) > 2e-2 * max(1.0, abs(pt["value"])):
                r["status"] = f"ok, but loss {r['value']:.4f} != {ref}'s {pt['value']:.4f}"


def _run_sizes(bench: Benchmark, sizes, dtype_name, args, device, out_dir, busy, shared, profile):
    """Runs one benchmark's cases at one size and reports them. Returns (ok, scoreboard rows): ok
    is False if a ptcore or baseline case failed. ``shared``: {(key, sizes, dtype): (benchmark,
    record)} of the cases in ``bench.shared``, measured once per suite run."""
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or (bench.quick_repeats if profile == "quick" else bench.repeats)[device]
    wanted = bench.case_names(profile, device, dtype)
    records = []
    todo = [(c, why) for c, why in bench.cases(device, dtype) if c in wanted]
    bar = tqdm(todo, desc=bench.name, unit="case", file=sys.stderr, leave=False)
    for case, why in bar:
        bar.set_postfix_str(case)
        key = bench.shared.get(case)
        key = key and (key, tuple(sizes.items()), dtype_name)
        if why is None and key in shared:
            source, rec = shared[key]
            records.append({**rec, "name": case, "note": f"same run as in {source}", "shared_from": source})
            continue
        if why is None:
            need, avail = bench.estimate_bytes(case, sizes, dtype), harness.available_bytes(device)
            if need > avail:
                why = f"needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
        rec = {"status": f"skipped: {why}"} if why else harness.run_case(
            bench.name, case, sizes, dtype_name, repeats, device, args.timeout)
        if rec["status"] != "ok":
            tqdm.write(f"{case}: {rec['status']}", file=sys.stderr)
        elif key:
            shared[key] = (bench.name, rec)
        records.append({"name": case, **rec, **({"note": bench.notes[case]} if case in bench.notes else {})})
    bar.close()
    ref = bench.reference(device, dtype)
    _derive(records, bench.flops(sizes), bench.baseline, ref)

    size_txt = " ".join(f"{k}={v}" for k, v in sizes.items())
    threads = next((r["threads"] for r in records if "threads" in r), torch.get_num_threads())
    meta = {"benchmark": bench.name, "profile": profile, "device": harness.device_name(device),
            "device_type": device, "torch": torch.__version__, "ptcore": ptcore.__version__, "threads": threads,
            "sizes": sizes, "dtype": dtype_name, "repeats": repeats, "flops": bench.flops(sizes),
            "unit": bench.unit, "baseline": bench.baseline, "reference": ref, "memory": MEMORY[device],
            "timing": harness.TIMING[device], "cpu_busy_percent_at_start": busy,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "heading": f"{bench.title}: {size_txt} {dtype_name} | {harness.device_name(device)} | "
                       f"torch {torch.__version__}, {threads} threads | median of {repeats} runs"}
    plain, md = report.tables(meta, records)
    print(f"\n{plain}\n\n{md}\n", flush=True)

    default = sizes == bench.sizes(profile, device) and dtype_name == bench.default_dtype[device]
    stem = bench.name if default else f"{bench.name}-{'-'.join(f'{k}{v}' for k, v in sizes.items())}-{dtype_name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / f"{stem}.json", meta, records)
    report.plot(out_dir / f"{stem}.png", meta, records)
    print(f"wrote {out_dir / stem}.json and .png", flush=True)
    own = (r for r in records if r["name"] == bench.baseline or r["name"].startswith("ptcore"))
    return not any(r["status"].startswith("failed") for r in own), scoreboard.from_records(bench, records, meta)


def _run_standalone(bench, profile, out_dir) -> tuple[bool, list[dict]]:
    if bench.needs_checkout and not harness.in_checkout():
        return True, [scoreboard.failed_row(bench.name, "skipped: needs a source checkout (it builds csrc/)")]
    path = out_dir / f"{bench.name}.json"
    path.unlink(missing_ok=True)
    status = bench.main((["--quick"] if profile == "quick" else []) + ["--out", str(out_dir)])
    try:
        rows = json.loads(path.read_text())["scoreboard"]
    except (OSError, ValueError, KeyError):
        rows = [scoreboard.failed_row(bench.name, f"failed: wrote no scoreboard rows (exit {status})")]
    return status == 0, rows


def _git_commit() -> str | None:
    if not harness.in_checkout():
        return None
    try:
        out = subprocess.run(["git", "-C", str(harness.REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _versions() -> dict:
    out = {"python": platform.python_version(), "ptcore": ptcore.__version__}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_meta(device: str, profile: str, elapsed: float, busy: float) -> dict:
    """What a results folder keeps of the run: machine, versions, commit, profile, time."""
    return {"profile": profile, "device": harness.device_name(device), "device_type": device,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "versions": _versions(),
            "ptcore": ptcore.__version__, "git_commit": _git_commit(), "elapsed_s": round(elapsed, 1),
            "cpu_busy_percent_at_start": busy, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "heading": f"ptcore scoreboard, {profile} profile | {harness.device_name(device)} | "
                       f"ptcore {ptcore.__version__}, torch {torch.__version__} | {elapsed:.0f} s"}


def main(argv: list[str]) -> int:
    """Returns 0, 1 when a ptcore or baseline case failed (a failing peer is only reported), 2 on
    bad arguments."""
    args = _parse(argv)
    if args.noise:
        try:
            spread = scoreboard.spread(args.noise)
        except ValueError as e:
            print(f"ptcore bench --noise: {e}", file=sys.stderr)
            return 2
        scoreboard.NOISE_FILE.write_text(json.dumps({"runs": [str(p) for p in args.noise], "spread": spread},
                                                    indent=2) + "\n")
        for k, v in sorted(spread.items(), key=lambda kv: -kv[1]):
            print(f"{v:7.1%}  {k}")
        print(f"wrote {scoreboard.NOISE_FILE}")
        return 0
    previous = None
    if args.compare:
        try:
            previous = scoreboard.read(args.compare)
        except ValueError as e:
            print(f"ptcore bench: {e}", file=sys.stderr)
            return 2
    device = args.device or harness.device_type()
    if device == "cuda" and not torch.cuda.is_available():
        print("ptcore bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    profile = "full" if args.full or args.sizes or args.large else "quick"
    out_dir = args.out or harness.results_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = psutil.cpu_percent(interval=1.0)  # before any case: nothing of ours is running
    if busy > 20:
        print(f"warning: the machine is {busy:.0f}% busy before the benchmark starts: other processes "
              "will make the timings noisy", file=sys.stderr)
    t0 = time.perf_counter()
    good, shared, rows = True, {}, []
    for name in [args.only] if args.only else list(registry.REGISTRY):
        try:
            bench = registry.load(name)
            if isinstance(bench, registry.Standalone):
                ok, new = _run_standalone(bench, profile, out_dir)
            else:
                sizes = bench.sizes(profile, device)
                if args.sizes:
                    vals = [int(v) for v in args.sizes.split(",")]
                    if len(vals) != len(bench.size_keys):
                        print(f"--sizes: {name} takes {','.join(bench.size_keys)}, got {args.sizes!r}", file=sys.stderr)
                        return 2
                    sizes = dict(zip(bench.size_keys, vals))
                ok, new = True, []
                for s in [sizes] + ([bench.large_sizes] if args.large and bench.large_sizes else []):
                    ok_s, rows_s = _run_sizes(bench, s, args.dtype or bench.default_dtype[device], args, device,
                                              out_dir, busy, shared, profile)
                    ok, new = ok and ok_s, new + rows_s
        except Exception as e:  # a broken benchmark is a row, not the end of the suite
            traceback.print_exc()
            ok, new = False, [scoreboard.failed_row(name, f"failed: {type(e).__name__}: {e}")]
        good &= ok
        rows += new
    meta = run_meta(device, profile, time.perf_counter() - t0, busy)
    if previous is not None:
        scoreboard.compare(rows, previous, scoreboard.noise_table())
    scoreboard.write(out_dir, rows, meta)
    print(f"wrote {out_dir / 'scoreboard.md'} and .json ({meta['elapsed_s']:.0f} s)", flush=True)
    return 0 if good else 1
