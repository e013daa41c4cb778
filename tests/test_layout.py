"""The package's layout rule: short files with one job. No Python file in ptcore/ is over
MAX_LINES lines, except the few listed in KNOWN_EXCEPTIONS, each with the reason it is still
long. An exception that no longer applies (the file was split, or is gone) fails too, so the
list only ever shrinks."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ptcore"
MAX_LINES = 400

# path relative to the repository root -> why it is still over MAX_LINES
KNOWN_EXCEPTIONS: dict[str, str] = {}


def line_counts() -> dict[str, int]:
    """{path relative to the repository root: number of lines} of every .py file under ptcore/."""
    return {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
            for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def test_the_scan_sees_the_package():
    counts = line_counts()
    assert "ptcore/__init__.py" in counts and "ptcore/engine/engine.py" in counts
    assert len(counts) > 20


def test_no_file_in_ptcore_is_over_the_limit():
    too_long = {p: n for p, n in line_counts().items() if n > MAX_LINES and p not in KNOWN_EXCEPTIONS}
    assert not too_long, (f"files in ptcore/ over {MAX_LINES} lines (split them by job): "
                          + ", ".join(f"{p} ({n})" for p, n in sorted(too_long.items())))


def test_every_exception_still_applies():
    counts = line_counts()
    stale = [p for p in KNOWN_EXCEPTIONS if counts.get(p, 0) <= MAX_LINES]
    assert not stale, (f"no longer over {MAX_LINES} lines (or gone): remove from "
                       f"tests/test_layout.py KNOWN_EXCEPTIONS: {', '.join(stale)}")
