"""Turning one benchmark's records into its outputs: the plain and markdown tables (same cells), the
JSON file and the PNG plot."""
from __future__ import annotations

import json
from pathlib import Path


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def _rate_headers(meta: dict) -> tuple[str, str]:
    """Headers of the rate column and of the fraction-of-baseline column: FLOP benchmarks compare
    with the bare GEMMs; others (UNIT = "token", "op", ...) with their own baseline row."""
    unit = meta.get("unit", "FLOP")
    if unit == "FLOP":
        return "GFLOP/s", "of GEMM"
    return f"{unit}s/s", f"rate / {meta['baseline']}"


def _columns(meta: dict):
    """(header, cell) pairs; a cell is '-' where a case did not run, and its status goes in 'note'."""
    ref, (rate_head, frac_head) = meta["reference"], _rate_headers(meta)
    flop = meta.get("unit", "FLOP") == "FLOP"
    return [
        ("implementation", lambda r: r["name"]),
        ("median s", lambda r: _num(r.get("median_s"), ".4g")),
        (rate_head, lambda r: _num(r.get("gflops") if flop else r.get("rate"), ".1f" if flop else ".4g")),
        (frac_head, lambda r: _num(r.get("frac_of_gemm"), ".3f")),
        ("extra peak MB", lambda r: _num(r.get("extra_peak_mb"), ".0f")),
        (f"time / {ref}", lambda r: _num(r.get("time_ratio"), ".2f")),
        (f"mem / {ref}", lambda r: _num(r.get("mem_ratio"), ".2f")),
        ("note", lambda r: "; ".join(v for v in (r["status"] if r["status"] != "ok" else "", r.get("note"))
                                     if v)),
    ]


def tables(meta: dict, records: list[dict]) -> tuple[str, str]:
    cols = _columns(meta)
    rows = [[cell(r) for _, cell in cols] for r in records]
    heads = [h for h, _ in cols]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]

    def line(cells):  # names and notes left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    plain = "\n".join([meta["heading"], line(heads), line(["-" * w for w in widths])] + [line(r) for r in rows])
    md = "\n".join([f"**{meta['heading']}**", "", "| " + " | ".join(heads) + " |",
                    "|" + "|".join("---" if i in (0, len(heads) - 1) else "---:" for i in range(len(heads))) + "|"]
                   + ["| " + " | ".join(r) + " |" for r in rows])
    return plain, md


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    path.write_text(json.dumps({**meta, "cases": records}, indent=2) + "\n")


def plot(path: Path, meta: dict, records: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "median_s" in r]  # every case that ran
    names = [r["name"] for r in ok][::-1]  # top to bottom in table order
    colors = ["tab:orange" if n == meta["reference"] else "#f5c28b" if n.startswith("ptcore") else "tab:gray"
              for n in names]  # ptcore highlighted, its default backend most
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(ok) + 1.8), sharey=True)
    frac_label = ("fraction of the bare-GEMM FLOP rate (1.0 = limit)" if meta.get("unit", "FLOP") == "FLOP"
                  else f"{meta.get('unit')} rate relative to {meta['baseline']}")
    panels = [("frac_of_gemm", frac_label, "{:.2f}"),
              ("extra_peak_mb", f"extra peak memory (MB, {meta['memory']})", "{:.0f}")]
    for ax, (key, label, fmt) in zip(axes, panels):
        vals = [r.get(key) or 0.0 for r in ok][::-1]
        bars = ax.barh(names, vals, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in vals], padding=3, fontsize=8)
        ax.set_xlabel(label)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    axes[0].axvline(1.0, color="k", lw=0.8, ls="--")
    fig.suptitle(meta["heading"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
