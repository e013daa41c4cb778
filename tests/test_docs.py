"""The documentation runs: the README's Python blocks and the ops' docstring examples."""
import doctest
import re
from pathlib import Path

import pytest

import ptcore.ops.cross_entropy
import ptcore.ops.fused_losses
import ptcore.ops.logprobs

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    scope = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)


@pytest.mark.parametrize("module", [ptcore.ops.cross_entropy, ptcore.ops.logprobs, ptcore.ops.fused_losses],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
