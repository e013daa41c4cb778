"""Builds ptcore's compiled modules with ninja: ``_C`` (C++17, OpenMP) and, when a CUDA toolkit is
found, ``_cuda`` (nvcc for sm_80 and sm_90 plus PTX, CUDA runtime linked statically).

Neither module includes torch's C++ headers, so both build in seconds and load under any torch.
Only the standard library, pybind11 and ninja are needed; setup.py and the test that compiles the
CUDA sources both call :func:`build`.

Environment:
  PTCORE_CUDA=1|0       force the CUDA module on (fail if no nvcc) or off; unset: build if nvcc is found
  CUDA_HOME             toolkit root (else the directory of ``nvcc`` on PATH, else /usr/local/cuda)
  PTCORE_CPU_ARCH       value of -march for the CPU module (default: native; e.g. x86-64-v3 for a wheel)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CSRC = Path(__file__).resolve().parent
CUDA_ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root holding bin/nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    found = [Path(c) for c in candidates if c and (Path(c) / "bin" / "nvcc").exists()]
    # Prefer a root that also holds the static runtime (a bare nvcc wrapper on PATH may not).
    for c in found:
        if _cudart_libdir(c) is not None:
            return c
    return found[0] if found else None


def _cudart_libdir(home: Path) -> Path | None:
    for d in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib",
              home / "targets" / "sbsa-linux" / "lib"):
        if (d / "libcudart_static.a").exists():
            return d
    return None


def want_cuda(flag: bool | None = None) -> tuple[bool, str]:
    """Whether to build the CUDA module, and why (or why not)."""
    env = os.environ.get("PTCORE_CUDA", "").strip().lower()
    if flag is None and env in ("0", "off", "false", "no"):
        return False, "PTCORE_CUDA=0"
    forced = flag is True or env in ("1", "on", "true", "yes")
    home = find_cuda_home()
    if home is None:
        if forced:
            raise RuntimeError("PTCORE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return False, "no CUDA toolkit (nvcc) found"
    if _cudart_libdir(home) is None:
        if forced:
            raise RuntimeError(f"PTCORE_CUDA=1 but the CUDA toolkit at {home} has no libcudart_static.a")
        return False, f"the CUDA toolkit at {home} has no libcudart_static.a"
    return True, f"nvcc at {home / 'bin' / 'nvcc'}"


def _ninja_bin() -> str:
    path = shutil.which("ninja")
    if path:
        return path
    try:
        import ninja  # the PyPI package ships the binary
        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError as e:
        raise RuntimeError("ninja is required to build ptcore: pip install ninja") from e


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as e:
        raise RuntimeError("pybind11 is required to build ptcore: pip install pybind11") from e
    return pybind11.get_include()


def _write_ninja(build_dir: Path, cuda_home: Path | None) -> dict[str, Path]:
    """Writes build.ninja and returns {module name: output path inside build_dir}."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    includes = f"-I{CSRC / 'include'} -I{_pybind11_include()} -I{sysconfig.get_paths()['include']}"
    march = os.environ.get("PTCORE_CPU_ARCH", "native")
    cxx = os.environ.get("CXX", "c++")
    lines = [
        f"cxx = {cxx}",
        f"cxxflags = -std=c++17 -O3 -fPIC -fvisibility=hidden -march={march} -fopenmp -Wall {includes}",
        "rule cxx", "  command = $cxx $cxxflags -MMD -MF $out.d -c $in -o $out", "  depfile = $out.d",
        "  deps = gcc",
        "rule link", "  command = $cxx -shared $in -o $out $ldflags",
    ]
    outputs: dict[str, Path] = {}

    def module(name: str, objs: list[str], ldflags: str) -> None:
        out = build_dir / f"{name}{suffix}"
        lines.append(f"build {out}: link {' '.join(objs)}")
        lines.append(f"  ldflags = {ldflags}")
        outputs[name] = out

    cpu_objs = []
    for src in sorted((CSRC / "cpu").glob("*.cpp")):
        obj = build_dir / "cpu" / (src.stem + ".o")
        lines.append(f"build {obj}: cxx {src}")
        cpu_objs.append(str(obj))
    module("_C", cpu_objs, "-fopenmp")

    if cuda_home is not None:
        nvcc = cuda_home / "bin" / "nvcc"
        lines += [
            f"nvcc = {nvcc}",
            f"nvccflags = -std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
            f"--expt-relaxed-constexpr {' '.join(CUDA_ARCHS)} -I{CSRC / 'include'}",
            "rule nvcc", "  command = $nvcc $nvccflags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d", "  deps = gcc",
        ]
        cuda_objs = []
        for src in sorted((CSRC / "cuda").glob("*.cu")):
            obj = build_dir / "cuda" / (src.stem + ".cu.o")
            lines.append(f"build {obj}: nvcc {src}")
            cuda_objs.append(str(obj))
        for src in sorted((CSRC / "cuda").glob("*.cpp")):
            obj = build_dir / "cuda" / (src.stem + ".o")
            lines.append(f"build {obj}: cxx {src}")
            lines.append(f"  cxxflags = -std=c++17 -O2 -fPIC -fvisibility=hidden -Wall {includes}")
            cuda_objs.append(str(obj))
        libdir = _cudart_libdir(cuda_home)
        if libdir is None:
            raise RuntimeError(f"no libcudart_static.a under the CUDA toolkit at {cuda_home}")
        # Static runtime: the module loads without libcudart from the installed torch.
        module("_cuda", cuda_objs, f"-L{libdir} -Wl,-Bstatic -lcudart_static -Wl,-Bdynamic -ldl -lrt -lpthread")

    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    return outputs


def build(build_dir: str | os.PathLike, *, cuda: bool | None = None, verbose: bool = False) -> dict[str, Path]:
    """Compiles the modules into ``build_dir``; returns {module name: shared library path}.

    ``cuda``: True forces the CUDA module (error without nvcc), False skips it, None follows
    PTCORE_CUDA and the presence of nvcc.
    """
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    do_cuda, why = (False, "disabled by caller") if cuda is False else want_cuda(cuda)
    outputs = _write_ninja(build_dir, find_cuda_home() if do_cuda else None)
    jobs = str(max(1, os.cpu_count() or 1))
    cmd = [_ninja_bin(), "-C", str(build_dir), "-j", jobs] + (["-v"] if verbose else [])
    proc = subprocess.run(cmd, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        out = (proc.stdout or "") + (proc.stderr or "")
        raise RuntimeError(f"ptcore build failed ({' '.join(cmd)}):\n{out}")
    if verbose:
        print(f"ptcore build: CUDA module {'built' if do_cuda else 'skipped'} ({why})")
    return outputs


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_dir")
    p.add_argument("--cuda", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args()
    res = build(args.build_dir, cuda={"auto": None, "on": True, "off": False}[args.cuda], verbose=True)
    for k, v in res.items():
        print(k, v)
    sys.exit(0)
