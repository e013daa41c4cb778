"""ptcore's Triton kernels, installed as ``ptcore.kernels``. They take torch tensors and know
nothing of ptcore's Python layers; ptcore.ops decides when they run.

This folder is only ever the package ``ptcore.kernels``. When the checkout's root is on
``sys.path`` (``python -m ...`` or pytest started there), Python also finds it as a top-level
``kernels``, which would shadow the PyPI package of that name (transformers imports it). That
import is handed on to whatever ``kernels`` is installed outside the checkout, or fails as if this
folder were not there: the top-level name never refers to this folder.
"""
if __name__ != "ptcore.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    _path = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        del _sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from .backbone import gated_act_backward, gated_act_forward, rms_norm_backward, rms_norm_forward, rope
    from .cross_entropy import cross_entropy_rows
    from .logprobs import logprob_rows_grad, logprob_rows_stats
    from .paged_attention import paged_attention_decode, paged_attention_extend
    from .speculative import speculative_verify

    __all__ = ["speculative_verify", "cross_entropy_rows", "logprob_rows_grad", "logprob_rows_stats",
               "paged_attention_decode", "paged_attention_extend"]
    __all__ += ["gated_act_backward", "gated_act_forward", "rms_norm_backward", "rms_norm_forward", "rope"]
