"""The suite runner: ``python -m bench [--only NAME] [--sizes ...] [--dtype ...] [--repeats R]
[--large] [--out DIR]``. For each registered benchmark and size: runs its cases one subprocess each
(skipping those that cannot run here or would not fit in memory), prints the plain and markdown
tables, and writes ``<out>/<name>[-<sizes>].json`` and ``.png`` (the default-size results take
the bare name, so a custom run never overwrites them)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

import ptcore
from bench import harness, registry, report

DEFAULT_REPEATS = {"cpu": 3, "cuda": 10}
MEMORY = {"cpu": "peak RSS over the RSS after making the inputs",
          "cuda": "CUDA allocator peak over the allocated memory after making the inputs"}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=[*registry.BENCHMARKS, *registry.STANDALONE],
                   help="run only this benchmark")
    p.add_argument("--sizes", help="one size, comma-separated in the benchmark's order (N,H,V)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int,
                   help="timed runs per case (default: 3 on CPU, 2 for the RL benchmarks; 10 on CUDA)")
    p.add_argument("--large", action="store_true", help="also run the benchmark's large size")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<device-slug>)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case (default 1800)")
    return p.parse_args(argv)


def _derive(records, flops, baseline, ref):
    """Adds median, the work rate (GFLOP/s, or units/s for a benchmark with its own UNIT), the
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


def _run_sizes(bench, sizes, dtype_name, args, device, out_dir, busy, shared) -> bool:
    """Runs all cases at one size, reports them; False if a ptcore or baseline case failed.
    ``shared``: {(key, sizes, dtype): (benchmark, record)} of the cases in a module's
    SHARED (the same work in every benchmark, e.g. the bare GEMMs), measured once per suite run."""
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or getattr(bench, "REPEATS", DEFAULT_REPEATS)[device]
    notes = getattr(bench, "NOTES", {})
    records = []
    bar = tqdm(bench.cases(device, dtype), desc=bench.NAME, unit="case", file=sys.stderr, leave=False)
    for case, why in bar:
        bar.set_postfix_str(case)
        key = getattr(bench, "SHARED", {}).get(case)
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
            bench.NAME, case, sizes, dtype_name, repeats, device, args.timeout)
        if rec["status"] != "ok":
            tqdm.write(f"{case}: {rec['status']}", file=sys.stderr)
        elif key:
            shared[key] = (bench.NAME, rec)
        records.append({"name": case, **rec, **({"note": notes[case]} if case in notes else {})})
    bar.close()
    ref = bench.reference(device, dtype)
    _derive(records, bench.flops(sizes), bench.BASELINE, ref)

    size_txt = " ".join(f"{k}={v}" for k, v in sizes.items())
    threads = next((r["threads"] for r in records if "threads" in r), torch.get_num_threads())
    meta = {"benchmark": bench.NAME, "device": harness.device_name(device), "device_type": device,
            "torch": torch.__version__, "ptcore": ptcore.__version__, "threads": threads,
            "sizes": sizes, "dtype": dtype_name, "repeats": repeats, "flops": bench.flops(sizes),
            "unit": getattr(bench, "UNIT", "FLOP"),
            "baseline": bench.BASELINE, "reference": ref, "memory": MEMORY[device],
            "cpu_busy_percent_at_start": busy,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "heading": f"{bench.TITLE}: {size_txt} {dtype_name} | {harness.device_name(device)} | "
                       f"torch {torch.__version__}, {threads} threads | median of {repeats} runs"}
    plain, md = report.tables(meta, records)
    print(f"\n{plain}\n\n{md}\n", flush=True)

    default = sizes == bench.DEFAULT_SIZES[device] and dtype_name == bench.DEFAULT_DTYPE[device]
    stem = bench.NAME if default else f"{bench.NAME}-{'-'.join(f'{k}{v}' for k, v in sizes.items())}-{dtype_name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / f"{stem}.json", meta, records)
    report.plot(out_dir / f"{stem}.png", meta, records)
    print(f"wrote {out_dir / stem}.json and .png", flush=True)
    own = (r for r in records if r["name"] == bench.BASELINE or r["name"].startswith("ptcore"))
    return not any(r["status"].startswith("failed") for r in own)


def main(argv: list[str]) -> int:
    """Returns 0, or 1 when a ptcore or baseline case failed (a failing peer is only reported)."""
    args = _parse(argv)
    device = harness.device_type()
    out_dir = args.out or harness.REPO / "bench" / "results" / harness.device_slug(device)
    busy = psutil.cpu_percent(interval=1.0)  # before any case: nothing of ours is running
    if busy > 20:
        print(f"warning: the machine is {busy:.0f}% busy before the benchmark starts: other processes "
              "will make the timings noisy", file=sys.stderr)
    good, shared = True, {}
    names = [args.only] if args.only else [*registry.BENCHMARKS, *registry.STANDALONE]
    for name in names:
        if name in registry.STANDALONE:
            good &= registry.load(name).main([]) == 0
            continue
        bench = registry.load(name)
        sizes = dict(bench.DEFAULT_SIZES[device])
        if args.sizes:
            vals = [int(v) for v in args.sizes.split(",")]
            if len(vals) != len(bench.SIZE_KEYS):
                print(f"--sizes: {name} takes {','.join(bench.SIZE_KEYS)}, got {args.sizes!r}", file=sys.stderr)
                return 2
            sizes = dict(zip(bench.SIZE_KEYS, vals))
        for s in [sizes] + ([bench.LARGE_SIZES] if args.large else []):
            good &= _run_sizes(bench, s, args.dtype or bench.DEFAULT_DTYPE[device], args, device, out_dir,
                               busy, shared)
    return 0 if good else 1
