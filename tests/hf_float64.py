"""Float64 oracles from Hugging Face models: their RMSNorm modules compute in fp32 whatever the
input (``hidden_states.to(torch.float32)``), so an unpatched float64 model is only fp32-accurate
in its norms (about 1e-8 relative), while ptcore's fused norms compute float64 in float64.
:func:`float64_norms` makes them run the same formula in float64 for float64 inputs outside
ptcore's fused path; every other dtype runs Hugging Face's code as is."""
import contextlib
import importlib

import torch

from ptcore.patching import SUPPORTED
from ptcore.patching import backbone


@contextlib.contextmanager
def float64_norms(archs=None):
    saved = {}
    for arch in archs or SUPPORTED:
        module, name = SUPPORTED[arch]
        backbone.install(module, name)  # the backbone gate first: this wraps it, never under it
        cls = getattr(importlib.import_module(module), name.removesuffix("ForCausalLM") + "RMSNorm")
        prev = saved[cls] = cls.__dict__["forward"]
        offset = 1.0 if arch == "gemma2" else 0.0  # Gemma's (1 + w)

        def forward(self, x, _prev=prev, _offset=offset):
            if x.dtype != torch.float64 or backbone.is_active():
                return _prev(self, x)
            eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * (self.weight + _offset)

        cls.forward = forward
    try:
        yield
    finally:
        for cls, prev in saved.items():
            cls.forward = prev
