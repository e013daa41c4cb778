"""Builds ptcore's compiled modules through csrc/build.py (ninja; pybind11; no torch headers).

The CPU modules always (``_C`` and its ISA variants ``_C_v3``, ``_C_v4``, or one ``_C`` when
PTCORE_CPU_ARCH names a -march such as native: csrc/build.py); ``_cuda`` when a CUDA toolkit is
found (PTCORE_CUDA=1 forces it, PTCORE_CUDA=0 skips it). Metadata lives in pyproject.toml.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_builder():
    spec = importlib.util.spec_from_file_location("ptcore_csrc_build", ROOT / "csrc" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class NinjaBuildExt(build_ext):
    """Compiles every module in one ninja run, then copies each where setuptools expects it."""

    def run(self):
        builder = _load_builder()
        # A build folder that outlives the build (not setuptools' temporary one), so that a
        # reinstall, an editable install after a wheel, or the suite's wheel test only recompiles
        # what changed; PTCORE_BUILD_DIR moves it.
        build_dir = Path(os.environ.get("PTCORE_BUILD_DIR") or ROOT / "build" / "ptcore-ninja")
        built = builder.build(build_dir, cuda=None, verbose=True)
        for ext in self.extensions:
            name = ext.name.split(".")[-1]
            if name not in built:
                continue
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Copy then rename: a process that has the old module loaded keeps its inode intact
            # (overwriting it in place crashes such a process).
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(built[name], tmp)
            os.replace(tmp, dest)


def _extensions():
    builder = _load_builder()
    exts = [Extension(f"ptcore.{name}", sources=[]) for name in builder.cpu_modules()]
    if builder.want_cuda()[0]:
        exts.append(Extension("ptcore._cuda", sources=[]))
    return exts


setup(
    # every subpackage of ptcore/ (a new one is installed without listing it), kernels/ as
    # ptcore.kernels and the benchmark suite bench/ as ptcore.bench (`ptcore bench` from a wheel)
    packages=["ptcore", *(f"ptcore.{p}" for p in find_packages("ptcore")), "ptcore.kernels", "ptcore.bench"],
    package_dir={"ptcore": "ptcore", "ptcore.kernels": "kernels", "ptcore.bench": "bench"},
    package_data={"ptcore.bench": ["noise.json", "README.md"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": NinjaBuildExt},
)
