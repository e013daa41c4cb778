"""The suite's verdict: one row per headline of every benchmark (ptcore's figure, the peer's, their
ratio, the target, met or not), built from the run's own results, printed at the end and written as
``scoreboard.md`` and ``scoreboard.json`` beside them; and ``--compare``: which figures moved by
more than the run-to-run noise against an earlier results folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = 1  # scoreboard.json's layout; --compare refuses a folder written with another
# Relative run-to-run spread of a ratio above which --compare calls a change a move, where the row
# has no measured spread (bench/noise.json has the measured ones, `python -m bench --noise`).
DEFAULT_NOISE = 0.10
NOISE_FILE = Path(__file__).with_name("noise.json")
FIGURES = {"rate": ("{:.4g}", "/s"), "extra_peak_mb": ("{:.0f}", " MB"), "frac_of_gemm": ("{:.3f}", " of GEMM")}


def row(benchmark: str, label: str, ptcore, peer=None, peer_value=None, *, unit: str = "",
        target=None, status: str = "ok", higher_is_better: bool = True) -> dict:
    """A scoreboard row: ``ratio = ptcore / peer_value``; ``target = (op, value)`` holds the ratio,
    or ptcore's figure when there is no peer."""
    ratio = ptcore / peer_value if ptcore is not None and peer_value not in (None, 0) else None
    judged = ratio if peer is not None else ptcore
    met = None
    if target is not None and judged is not None and status == "ok":
        op, value = target
        met = judged >= value if op == ">=" else judged <= value
    return {"benchmark": benchmark, "label": label, "ptcore": ptcore, "peer": peer, "peer_value": peer_value,
            "unit": unit, "ratio": ratio, "target": None if target is None else list(target),
            "met": met, "status": status, "higher_is_better": higher_is_better}


def failed_row(benchmark: str, status: str) -> dict:
    """The row of a benchmark that failed or was skipped as a whole."""
    return row(benchmark, "-", None, status=status)


def from_records(bench, records: list[dict], meta: dict) -> list[dict]:
    """The rows of a shared-runner benchmark (bench/registry.py's Headline) from its records."""
    by = {r["name"]: r for r in records}
    out = []
    for h in bench.headlines:
        mine = by.get(h.ptcore or meta["reference"], {})
        peer = by.get(h.peer, {}) if h.peer else None
        fmt_unit = FIGURES[h.figure][1]
        if h.figure == "frac_of_gemm" and "GEMM" not in meta["baseline"]:
            fmt_unit = f" of {meta['baseline']}"
        unit = f" {meta['unit']}s/s" if h.figure == "rate" and meta["unit"] != "FLOP" else \
            " GFLOP/s" if h.figure == "rate" else fmt_unit
        scale = 1e-9 if h.figure == "rate" and meta["unit"] == "FLOP" else 1.0
        value = lambda r: None if r is None or r.get(h.figure) is None else r[h.figure] * scale  # noqa: E731
        status = "ok"
        for name, r in ((h.ptcore or meta["reference"], mine), (h.peer, peer)):
            if r is not None and r.get("status", "missing") != "ok":
                status = f"{name}: {r.get('status', 'not run')}"
                break
        out.append(row(bench.name, h.label, value(mine), h.peer, value(peer), unit=unit, target=h.target,
                       status=status, higher_is_better=h.figure != "extra_peak_mb"))
    return out


def _fmt(v, unit=""):
    if v is None:
        return "-"
    return f"{v:.4g}{unit}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}{unit}"


def _cells(r: dict) -> list[str]:
    target = "-" if r["target"] is None else f"{'ratio' if r['peer'] else 'ptcore'} {r['target'][0]} {r['target'][1]:.3g}"
    met = {True: "met", False: "NOT MET", None: "-"}[r["met"]]
    if r["status"] != "ok":
        met = r["status"]
    cells = [r["benchmark"], r["label"], _fmt(r["ptcore"], r["unit"]), r["peer"] or "-",
             _fmt(r["peer_value"], r["unit"]), "-" if r["ratio"] is None else f"{r['ratio']:.3g}", target, met]
    if "moved" in r:
        cells.append(r["moved"])
    return cells


HEADS = ["benchmark", "headline", "ptcore", "peer", "peer's", "ratio", "target", "verdict"]


def tables(rows: list[dict], heading: str) -> tuple[str, str]:
    heads = HEADS + (["vs previous"] if any("moved" in r for r in rows) else [])
    cells = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = lambda c: "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()  # noqa: E731
    plain = "\n".join([heading, line(heads), line(["-" * w for w in widths]), *map(line, cells)])
    met = sum(r["met"] is True for r in rows)
    judged = sum(r["met"] is not None for r in rows)
    summary = f"{met} of {judged} targets met; {sum(r['status'] != 'ok' for r in rows)} rows did not run"
    md = "\n".join([f"**{heading}**", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads),
                    *("| " + " | ".join(c) + " |" for c in cells), "", summary])
    return plain + "\n" + summary, md


def write(out_dir: Path, rows: list[dict], meta: dict) -> str:
    """Writes scoreboard.json (rows and the run's machine, versions and commit) and scoreboard.md;
    returns the markdown."""
    plain, md = tables(rows, meta["heading"])
    (out_dir / "scoreboard.json").write_text(json.dumps({"schema": SCHEMA, **meta, "rows": rows}, indent=2) + "\n")
    (out_dir / "scoreboard.md").write_text(md + "\n")
    print("\n" + plain + "\n", flush=True)
    return md


def read(folder: Path) -> dict:
    """An earlier run's scoreboard.json; a clear error when it is missing or of another layout."""
    path = Path(folder) / "scoreboard.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--compare: {folder} has no scoreboard.json (not a results folder of "
                         "`ptcore bench`)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else None
        raise ValueError(f"--compare: {path} was written by an incompatible version of the suite "
                         f"(scoreboard schema {got!r}, this version writes {SCHEMA}; ptcore "
                         f"{data.get('ptcore', '?') if isinstance(data, dict) else '?'})")
    return data


def noise_table() -> dict:
    """{"benchmark/headline": relative spread} measured by repeating the quick profile."""
    try:
        return json.loads(NOISE_FILE.read_text())["spread"]
    except (OSError, ValueError, KeyError):
        return {}


def compare(rows: list[dict], previous: dict, noise: dict) -> None:
    """Marks each row's ``moved``: how its ratio (or figure, without a peer) changed against the
    previous run, flagged when the change exceeds the row's noise (at least DEFAULT_NOISE where
    it was not measured)."""
    before = {(r["benchmark"], r["label"]): r for r in previous["rows"]}
    for r in rows:
        old = before.get((r["benchmark"], r["label"]))
        key = "ratio" if r["peer"] else "ptcore"
        if old is None or old.get(key) is None or r.get(key) is None:
            r["moved"] = "new" if old is None else "-"
            continue
        change = r[key] / old[key] - 1 if old[key] else math.inf
        limit = max(noise.get(f"{r['benchmark']}/{r['label']}", 0.0) * 1.5, DEFAULT_NOISE if
                    f"{r['benchmark']}/{r['label']}" not in noise else 0.02)
        better = (change > 0) == r.get("higher_is_better", True)
        r["moved"] = (f"{change:+.0%} ({'better' if better else 'WORSE'})" if abs(change) > limit
                      else f"{change:+.0%} (within noise {limit:.0%})")


def spread(folders: list[Path]) -> dict:
    """Relative spread (max / min - 1) of every row's ratio (or figure) across repeated runs."""
    runs = [read(f)["rows"] for f in folders]
    values = {}
    for rows in runs:
        for r in rows:
            v = r["ratio"] if r["peer"] else r["ptcore"]
            if v is not None and v > 0:
                values.setdefault(f"{r['benchmark']}/{r['label']}", []).append(v)
    return {k: max(v) / min(v) - 1 for k, v in values.items() if len(v) == len(runs)}


README_BEGIN = "<!-- scoreboard: generated by `python -m bench.scoreboard --readme {source}`; do not edit -->"
README_END = "<!-- /scoreboard -->"


def readme_block(data: dict, source: str) -> str:
    """The README's benchmark table: the scoreboard of the results file ``source`` (a
    scoreboard.json), with where it came from."""
    _, md = tables(data["rows"], data["heading"])
    commit = data.get("git_commit") or "an installed wheel"
    return "\n".join([README_BEGIN.format(source=source), "",
                      f"Run of {data['date']} at commit {commit}, `{data['profile']}` profile, "
                      f"{data['elapsed_s']:.0f} s, on {data['device']} ({data['threads']} threads; "
                      f"{data['cpu_busy_percent_at_start']:.0f}% busy at the start).", "", md, "", README_END])


def update_readme(readme: Path, results: Path) -> None:
    """Replaces the README's scoreboard block by the one of ``results`` (a scoreboard.json)."""
    text = readme.read_text()
    begin = text.index(README_BEGIN.split("{source}")[0])
    end = text.index(README_END, begin) + len(README_END)
    source = results.resolve().relative_to(readme.resolve().parent).as_posix()
    readme.write_text(text[:begin] + readme_block(json.loads(results.read_text()), source) + text[end:])


if __name__ == "__main__":  # python -m bench.scoreboard --readme docs/results/<run>/scoreboard.json
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.scoreboard", description=update_readme.__doc__)
    p.add_argument("--readme", type=Path, required=True, metavar="SCOREBOARD_JSON")
    a = p.parse_args()
    update_readme(Path(__file__).resolve().parent.parent / "README.md", a.readme)
