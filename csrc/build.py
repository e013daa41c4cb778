"""Builds ptcore's compiled modules with ninja: the CPU modules (C++17, OpenMP) and, when a CUDA
toolkit is found, ``_cuda`` (nvcc for sm_80 and sm_90 plus PTX, CUDA runtime linked statically).

No module includes torch's C++ headers, so all build in seconds and load under any torch.
Only the standard library, pybind11 and ninja are needed; setup.py and the test that compiles the
CUDA sources both call :func:`build`.

CPU modules. By default the build is portable (a wheel built on one x86-64 machine runs on any
x86-64-v2 CPU, 2009 on) with run-time dispatch of the hot loops:
  ``_C``      everything (the kernels, the radix cache, the CPUID check), at -march=x86-64-v2
  ``_C_v3``   the compute-bound kernels (HOT_SOURCES) again at -march=x86-64-v3 (AVX2, FMA)
  ``_C_v4``   the same at -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)
ptcore/_ext.py asks ``_C.cpu_isa_levels()`` (``__builtin_cpu_supports``, which also checks that
the OS saves the AVX/AVX-512 registers) at import and takes the best variant the CPU runs;
``PTCORE_CPU_ISA=v2|v3|v4`` forces a lower one. One shared object per ISA level, never mixed:
inline functions and template instantiations (ptcore's headers, std::) compiled at several
-march levels in one object would be merged by the linker (COMDAT), so an AVX-512 copy could be
called from baseline code; each module also exports nothing but its ``PyInit_*`` (a version
script), so no symbol of one module can bind to another's. Off x86-64, one ``_C`` at the
compiler's default target.

Environment:
  PTCORE_CUDA=1|0       force the CUDA module on (fail if no nvcc) or off; unset: build if nvcc is found
  CUDA_HOME             toolkit root (else the directory of ``nvcc`` on PATH, else /usr/local/cuda)
  PTCORE_CPU_ARCH       unset or ``portable``: the dispatched build above (the default). Any other
                        value is the -march of a single ``_C`` with no variants and no dispatch:
                        ``native`` (opt-in, fastest on the build machine, SIGILL on an older CPU:
                        never for a wheel you ship), or e.g. ``x86-64-v3`` (needs AVX2 to load)
  CXX                   the C++ compiler (default c++)
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CSRC = Path(__file__).resolve().parent
# The CPU sources whose loops are compute-bound: compiled once per ISA level into _C (baseline) and
# each _C_<isa> variant (with the files of the same kernel that a variant links: the paged
# attention's check, work plan and binding). Every other csrc/cpu source is built once, into _C,
# at the baseline.
HOT_SOURCES = ("backbone.cpp", "cross_entropy_rows.cpp", "logprob_rows.cpp", "paged_attention.cpp",
               "paged_attention_bindings.cpp", "paged_attention_check.cpp", "paged_attention_plan.cpp",
               "speculative_verify.cpp")
# ISA level -> -march; the first is the baseline every x86-64 build of _C targets.
ISA_LEVELS = {"v2": "x86-64-v2", "v3": "x86-64-v3", "v4": "x86-64-v4"}
BASELINE_ISA = "v2"
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


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


def cpu_plan(arch: str | None = None) -> list[tuple[str, str, str | None]]:
    """[(module name, ISA label, -march or None)] of the CPU modules to build, ``_C`` first.

    ``arch``: as PTCORE_CPU_ARCH (read when ``arch`` is None): unset, "" or "portable" gives the
    dispatched build (x86-64: ``_C`` at x86-64-v2 plus ``_C_v3`` and ``_C_v4``; elsewhere one ``_C``
    at the compiler's default); any other value one ``_C`` at ``-march=<arch>``, no variants.
    """
    arch = (os.environ.get("PTCORE_CPU_ARCH", "") if arch is None else arch).strip()
    if arch.lower() in ("", "portable"):
        if not _is_x86_64():
            return [("_C", "default", None)]
        return [("_C" if isa == BASELINE_ISA else f"_C_{isa}", isa, march) for isa, march in ISA_LEVELS.items()]
    return [("_C", arch, arch)]


def cpu_modules(arch: str | None = None) -> list[str]:
    """Names of the CPU modules :func:`build` makes (setup.py's extension list)."""
    return [name for name, _, _ in cpu_plan(arch)]


def _write_ninja(build_dir: Path, cuda_home: Path | None, arch: str | None = None) -> dict[str, Path]:
    """Writes build.ninja and returns {module name: output path inside build_dir}."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    includes = f"-I{CSRC / 'include'} -I{_pybind11_include()} -I{sysconfig.get_paths()['include']}"
    cxx = os.environ.get("CXX", "c++")
    lines = [
        f"cxx = {cxx}",
        f"cxxflags = -std=c++17 -O3 -fPIC -fvisibility=hidden -fopenmp -Wall {includes}",
        "archflags =",
        "defines =",
        "rule cxx", "  command = $cxx $cxxflags $archflags $defines -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d", "  deps = gcc",
        "rule link", "  command = $cxx -shared $in -o $out $ldflags",
    ]
    outputs: dict[str, Path] = {}
    linux = sys.platform.startswith("linux")

    def module(name: str, objs: list[str], ldflags: str, export_only_init: bool = False) -> None:
        out = build_dir / f"{name}{suffix}"
        if export_only_init and linux:
            # Only PyInit_<name> is exported: every other symbol (std:: template instantiations
            # included, which libstdc++ marks default-visible) stays local, so calls never cross
            # from one ISA level's module into another's.
            script = build_dir / f"{name}.map"
            text = f"{{ global: PyInit_{name}; local: *; }};\n"
            if not script.exists() or script.read_text() != text:
                script.write_text(text)
            ldflags += f" -Wl,--version-script={script}"
        lines.append(f"build {out}: link {' '.join(objs)}")
        lines.append(f"  ldflags = {ldflags}")
        outputs[name] = out

    def compile_cpp(src: Path, obj: Path, march: str | None, defines: str = "") -> str:
        lines.append(f"build {obj}: cxx {src}")
        if march:
            lines.append(f"  archflags = -march={march}")
        if defines:
            lines.append(f"  defines = {defines}")
        return str(obj)

    for name, isa, march in cpu_plan(arch):
        tag = isa.replace("/", "_")
        objdir = build_dir / "cpu" / "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
        # The label the module reports (ptcore info): its ISA level and -march, as C string macros.
        info = f"'-DPTCORE_ISA=\"{isa}\"' '-DPTCORE_BUILD_ARCH=\"{march or 'default'}\"'"
        if name == "_C":
            objs = []
            for src in sorted((CSRC / "cpu").glob("*.cpp")):
                defs = info if src.name == "cpu_features.cpp" else ""
                objs.append(compile_cpp(src, objdir / (src.stem + ".o"), march, defs))
        else:
            objs = [compile_cpp(CSRC / "cpu" / src, objdir / (Path(src).stem + ".o"), march) for src in HOT_SOURCES]
            objs.append(compile_cpp(CSRC / "isa" / "variant_module.cpp", objdir / "variant_module.o", march,
                                    f"{info} -DPTCORE_MODULE_NAME={name}"))
        module(name, objs, "-fopenmp", export_only_init=True)

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


def build(build_dir: str | os.PathLike, *, cuda: bool | None = None, verbose: bool = False,
          arch: str | None = None) -> dict[str, Path]:
    """Compiles the modules into ``build_dir``; returns {module name: shared library path}.

    ``cuda``: True forces the CUDA module (error without nvcc), False skips it, None follows
    PTCORE_CUDA and the presence of nvcc. ``arch``: the CPU modules' target, as PTCORE_CPU_ARCH
    (None: read PTCORE_CPU_ARCH; see :func:`cpu_plan`).
    """
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    do_cuda, why = (False, "disabled by caller") if cuda is False else want_cuda(cuda)
    outputs = _write_ninja(build_dir, find_cuda_home() if do_cuda else None, arch)
    jobs = str(max(1, os.cpu_count() or 1))
    cmd = [_ninja_bin(), "-C", str(build_dir), "-j", jobs] + (["-v"] if verbose else [])
    proc = subprocess.run(cmd, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        out = (proc.stdout or "") + (proc.stderr or "")
        raise RuntimeError(f"ptcore build failed ({' '.join(cmd)}):\n{out}")
    if verbose:
        plan = ", ".join(f"{n} (-march={m or 'compiler default'})" for n, _, m in cpu_plan(arch))
        print(f"ptcore build: CPU modules {plan}")
        print(f"ptcore build: CUDA module {'built' if do_cuda else 'skipped'} ({why})")
    return outputs


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_dir")
    p.add_argument("--cuda", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--cpu-arch", help="as PTCORE_CPU_ARCH (default: its value, else portable)")
    args = p.parse_args()
    res = build(args.build_dir, cuda={"auto": None, "on": True, "off": False}[args.cuda], verbose=True,
                arch=args.cpu_arch)
    for k, v in res.items():
        print(k, v)
    sys.exit(0)
