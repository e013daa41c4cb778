"""``python -m ptcore.info`` / ``ptcore info``: versions and which backends are available, and why not."""
from __future__ import annotations

import platform
import sys


def report() -> str:
    import torch

    import ptcore
    from ptcore import _ext
    from ptcore.ops import dispatch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"ptcore {ptcore.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"cuda available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})",
        f"triton {triton_version}",
        "backends:",
    ]
    for name, why in dispatch.status().items():
        lines.append(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    lines.append(f"cpu kernels: {_ext.cpu_variant_text()}")  # which ISA variant of ptcore._C, and why
    forced = dispatch.requested_backend()
    lines.append(f"forced backend: {forced or 'none (' + dispatch.preference_text() + ')'}")
    lines.append("ops (backend: yes / no (why) | the tensors it takes; conditions [source]):")
    lines += dispatch.table_lines()
    return "\n".join(lines)


def main() -> int:
    from ptcore._ext import CpuIsaError

    try:
        print(report())
    except CpuIsaError as e:  # PTCORE_CPU_ISA asks for a variant this build or CPU lacks
        print(f"ptcore info: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
