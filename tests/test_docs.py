"""The documentation runs: the Python blocks of the README and of docs/*.md, and the ops' docstring
examples."""
import doctest
import re
from pathlib import Path

import pytest

import ptcore.ops.cross_entropy
import ptcore.ops.fused_losses
import ptcore.ops.logprobs

ROOT = Path(__file__).resolve().parents[1]
# The README must have examples; a docs page is tested when it has any (benchmarks.md has none).
DOCS = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if "```python" in p.read_text())]


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


@pytest.mark.parametrize("module", [ptcore.ops.cross_entropy, ptcore.ops.logprobs, ptcore.ops.fused_losses],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
