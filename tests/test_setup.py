"""A fresh machine: nothing in the checkout shadows an installed package, whatever the working
directory, and the set-up installs through the committed constraints file."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import checkout_shadows

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, **env) -> subprocess.CompletedProcess:
    """The venv's python started in the repository root, where '' (the root) leads sys.path."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_transformers_imports_from_the_repository_root():
    """transformers >= 5.25 imports the PyPI package `kernels` inside transformers.activations; the
    checkout's kernels/ folder must not answer that import."""
    pytest.importorskip("transformers")
    proc = _run_from_root("""
        import sys, transformers.activations
        m = sys.modules.get('kernels')
        print('kernels:', getattr(m, '__file__', None))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("kernels:")][0]
    assert str(ROOT / "kernels") not in line, line


def test_an_installed_kernels_package_resolves_outside_the_repository(tmp_path):
    """With the root first on sys.path and a package `kernels` installed after it, `import kernels`
    gets the installed one; with none installed it fails as if the folder were not there."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    proc = _run_from_root("""
        import kernels, ptcore.kernels
        print(kernels.WHO, kernels.__file__)
        print(ptcore.kernels.__name__, ptcore.kernels.__file__)
    """, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.splitlines()[-2:]
    assert first == f"installed {site / 'kernels' / '__init__.py'}"
    assert second == f"ptcore.kernels {ROOT / 'kernels' / '__init__.py'}"

    proc = _run_from_root("""
        import sys
        sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]
        sys.path.insert(0, '')
        try:
            import kernels
        except ModuleNotFoundError as e:
            print('missing', e.name, 'kernels' in sys.modules)
    """)
    assert proc.stdout.strip() == "missing kernels False", proc.stdout + proc.stderr[-2000:]


def test_shadow_check_catches_a_module_from_the_checkout():
    """The session-end guard of conftest.py is not vacuous: a foreign name pointing into the
    checkout is reported, and ptcore's own modules are not."""
    fake = type(sys)("kernels")
    fake.__file__ = str(ROOT / "kernels" / "__init__.py")
    assert checkout_shadows({"kernels": fake}) == [f"kernels -> {fake.__file__}"]
    import torch  # noqa: F401  (torch.ops carries a bare relative __file__, '_ops.py')
    ours = {k: sys.modules[k] for k in ("ptcore", "ptcore.kernels", "torch", "torch.ops") if k in sys.modules}
    assert checkout_shadows(ours) == []


def test_constraints_pin_every_requirement_of_the_setup():
    """Every distribution the set-up installs is pinned exactly in requirements/constraints.txt
    (torch excepted: setup.sh pins it), so a fresh machine gets the verified versions."""
    lines = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    pins = {}
    for ln in lines:
        if ln.strip() and not ln.startswith("#"):
            name, sep, ver = ln.partition("==")
            assert sep and ver, f"constraints.txt: {ln!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = ver
    assert "torch" not in pins
    for need in ("transformers", "triton", "numpy", "pytest", "pybind11", "ninja", "trl", "gguf"):
        assert need in pins, f"constraints.txt does not pin {need}"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "requirements/constraints.txt" in setup and '-c "$CONSTRAINTS"' in setup
