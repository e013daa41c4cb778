"""Patch Hugging Face causal LMs so that training runs ptcore's fused LM-head losses.

``ptcore.patch`` is the function :func:`patch`; this package is ``ptcore.patching`` (a package
named ``ptcore.patch`` would be shadowed by the function). ``ptcore.patch.SUPPORTED`` also works:
the function carries the table as an attribute.
"""
from ptcore.patching.forward import causal_lm_loss
from ptcore.patching.install import is_patched, patch, patch_class, unpatch, unpatch_class
from ptcore.patching.registry import SUPPORTED

patch.SUPPORTED = SUPPORTED

__all__ = ["SUPPORTED", "causal_lm_loss", "is_patched", "patch",
           "patch_class", "unpatch", "unpatch_class"]
