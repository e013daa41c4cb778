"""`ptcore bench` from an installed wheel, outside any checkout: a wheel built from this checkout
(its persistent ninja build folder is reused, so only what changed recompiles), installed into a
folder of its own, run from an empty directory: ptcore and ptcore.bench resolve inside the
installed folder, the benchmark runs and writes its scoreboard under ./ptcore-bench-results/, and
a benchmark that needs the sources says so instead of failing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    wheels, site = root / "dist", root / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = wheels.glob("ptcore-*.whl")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    work = root / "work"
    work.mkdir()
    return site, work, {**os.environ, "PYTHONPATH": str(site)}


def test_wheel_holds_the_suite(installed):
    site, work, env = installed
    code = "import ptcore, ptcore.bench.run, ptcore.bench.registry as r; print(ptcore.__file__); " \
           "print(ptcore.bench.run.__file__); print(len(r.REGISTRY))"
    p = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    core, bench, n = p.stdout.split()
    assert Path(core).is_relative_to(site) and Path(bench).is_relative_to(site), p.stdout
    assert int(n) > 10
    assert (site / "ptcore" / "bench" / "README.md").is_file()


def test_ptcore_bench_runs_outside_a_checkout(installed):
    site, work, env = installed
    p = subprocess.run([sys.executable, "-m", "ptcore", "bench", "--only", "radix_cache"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    (board,) = (work / "ptcore-bench-results").glob("*/scoreboard.json")
    data = json.loads(board.read_text())
    assert data["git_commit"] is None  # not a checkout
    (row,) = data["rows"]
    # the brute-force baseline lives in the checkout's tests/: its row says so, ptcore's row ran
    assert row["benchmark"] == "radix_cache" and row["ptcore"] > 0
    assert "tests/radix_oracle.py" in row["status"]
    p = subprocess.run([sys.executable, "-m", "ptcore", "bench", "--only", "cpu_dispatch"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(board.read_text())
    assert data["rows"][0]["status"] == "skipped: needs a source checkout (it builds csrc/)"
