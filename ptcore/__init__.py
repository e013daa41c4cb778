"""ptcore: fused kernels and loops for LLM post-training (SFT, RLxF, test-time compute).

``import ptcore`` never fails because a compiled backend is missing; ``python -m ptcore info``
prints which backends are available here and why the others are not.
"""
__version__ = "0.1.0"

# torch first: the compiled modules then share its OpenMP runtime (same libgomp soname).
import torch  # noqa: F401

from ptcore import nn, ops  # noqa: E402
from ptcore.ops import BackendUnavailable, chunk_budget, use_backend  # noqa: E402
# The functions; the package is ptcore.patching (ptcore.patch.SUPPORTED still works).
from ptcore.patching import patch, patch_class, unpatch  # noqa: E402

__all__ = ["BackendUnavailable", "chunk_budget", "nn", "ops", "patch", "patch_class", "unpatch",
           "use_backend", "__version__"]
