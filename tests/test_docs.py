"""The documentation runs: the Python blocks of the README and of docs/*.md, and the ops' docstring
examples."""
import doctest
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import ptcore.ops.cross_entropy
import ptcore.ops.fused_dpo
import ptcore.ops.fused_policy
import ptcore.ops.logprobs

ROOT = Path(__file__).resolve().parents[1]
# The README must have examples; a docs page is tested when it has any (benchmarks.md has none).
DOCS = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if "```python" in p.read_text())]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared" + "/reference")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    """Each document's blocks run in order in one namespace, in a scratch directory (examples
    write their outputs to relative paths)."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks, f"{doc.name} has no Python example"
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), scope)


@pytest.mark.parametrize("module", [ptcore.ops.cross_entropy, ptcore.ops.logprobs, ptcore.ops.fused_policy,
                                    ptcore.ops.fused_dpo],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / f for f in out.decode().split("\0") if f and not f.startswith(".ci/")]


def test_nothing_cites_files_outside_the_repository():
    """A user's clone has no sibling shared/ directory: no tracked file (code, tests, docs, build
    files; .ci/ excepted) may cite one. The math those citations pointed to is in docs/."""
    hits = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if any(p in line for p in OUTSIDE):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "cite docs/ instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    missing = [t for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")
               and not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []
