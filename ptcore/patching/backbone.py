"""The fused backbone in patched models (``ptcore.patch(model, backbone=True)``, the default):
RMSNorm with the residual add, RoPE on q and k, and SwiGLU / GeGLU from ptcore.ops.

How it is wired: for each supported architecture, its transformers module's ``*RMSNorm``,
``*MLP`` and ``*DecoderLayer`` forwards and its ``apply_rotary_pos_emb`` are wrapped once, on the
class, by a gate: they run ptcore's fused version only while a patched model's training forward
(labels / head_loss) is running with the backbone on (a context variable), and Hugging Face's
own code otherwise. So generation, inference and unpatched models run the original code exactly,
and one model can be patched with and another without the backbone.

Per call the fused path falls back to Hugging Face's code where the op cannot take its tensors
(mixed dtypes under autocast, a non-contiguous input, cos / sin that require grad), so the
result never depends on it. Not fused while the model has gradient checkpointing on: the
recomputation in backward runs outside the context and must see the same code as the forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect

from ptcore.ops.backbone import geglu, rms_norm, rope, swiglu

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("ptcore_backbone", default=False)
_installed: set[str] = set()


def is_active() -> bool:
    """Whether the fused backbone is on here (inside a backbone model's training forward)."""
    return _active.get()


def enabled(model) -> bool:
    """Whether ``model`` (patched) runs the fused backbone in its training forward."""
    return bool(getattr(model, "_ptcore_backbone", False)) and not _checkpointing(model)


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


@contextlib.contextmanager
def active(model):
    """The fused backbone on for the block when ``model`` has it enabled."""
    token = _active.set(enabled(model))
    try:
        yield
    finally:
        _active.reset(token)


def _gated(original, fused):
    @functools.wraps(original)
    def forward(*args, **kwargs):
        if _active.get():
            return fused(original, *args, **kwargs)
        return original(*args, **kwargs)
    forward.__ptcore_backbone_original__ = original
    return forward


# ---- the pieces ----

def _norm_params(module):
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    offset = 1.0 if type(module).__name__.startswith("Gemma") else 0.0  # Gemma's (1 + weight)
    return eps, offset


def _fusable(*tensors) -> bool:
    first = tensors[0]
    return all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous()
               and t.is_floating_point() for t in tensors)


def _norm_forward(original, self, x):
    eps, offset = _norm_params(self)
    if eps is None or not _fusable(x, self.weight):
        return original(self, x)
    return rms_norm(x, self.weight, eps, offset=offset)


def add_norm(norm, x, residual):
    """``(norm(residual + x), residual + x)``: one fused op where it can take the tensors."""
    eps, offset = _norm_params(norm)
    if eps is not None and _fusable(x, residual, norm.weight):
        return rms_norm(x, norm.weight, eps, residual=residual, offset=offset)
    s = residual + x
    return norm(s), s


def _act_op(act):
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return swiglu
    if name in ("GELUTanh", "PytorchGELUTanh"):
        return geglu
    return None


def _gated_product(act, gate, up):
    op = _act_op(act)
    if op is None or not _fusable(gate, up):
        return None
    return op(gate, up)


def _mlp_forward(original, self, x):
    if hasattr(self, "gate_up_proj"):  # Phi-3: one projection, halves [gate | up]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        y = _gated_product(self.activation_fn, gate.contiguous(), up.contiguous())
        return original(self, x) if y is None else self.down_proj(y)
    y = _gated_product(self.act_fn, self.gate_proj(x), self.up_proj(x))
    return original(self, x) if y is None else self.down_proj(y)


def _rope_fn(original, q, k, cos, sin, unsqueeze_dim=1, **extra):
    """HF's apply_rotary_pos_emb(q [B, heads, T, D], k, cos [B or 1, T, R], sin)."""
    if extra or unsqueeze_dim != 1 or q.dim() != 4 or cos.dim() != 3 or cos.requires_grad or sin.requires_grad:
        return original(q, k, cos, sin, unsqueeze_dim, **extra)
    # ptcore's layout [B, T, heads, D]: what q_proj wrote, contiguous; a slice of a fused qkv
    # projection (Phi-3) is copied once here, as the unfused rotate_half copies it anyway.
    qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    if not _fusable(qt, kt, cos, sin):
        return original(q, k, cos, sin, unsqueeze_dim)
    qo, ko = rope(qt, kt, cos, sin)
    return qo.transpose(1, 2), ko.transpose(1, 2)


def _layer_args(original, self, hidden_states, args, kwargs):
    """The layer's arguments other than hidden_states, by name (what it passes to self_attn)."""
    bound = inspect.signature(original).bind(self, hidden_states, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop("self")
    named.pop("hidden_states")
    for name, p in inspect.signature(original).parameters.items():
        if p.kind is p.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def _llama_layer(original, self, hidden_states, *args, **kwargs):
    """Llama / Qwen2 / Qwen3 / Mistral / Phi-3: the residual add after attention fused into the
    post-attention norm."""
    named = _layer_args(original, self, hidden_states, args, kwargs)
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, **named)
    if hasattr(self, "resid_attn_dropout"):  # Phi-3
        h = self.resid_attn_dropout(h)
    h, residual = add_norm(self.post_attention_layernorm, h, hidden_states)
    h = self.mlp(h)
    if hasattr(self, "resid_mlp_dropout"):
        h = self.resid_mlp_dropout(h)
    return residual + h


def _gemma2_layer(original, self, hidden_states, *args, **kwargs):
    """Gemma 2's pre and post norms: the residual add after the post-attention norm fused into
    the pre-feed-forward norm."""
    named = _layer_args(original, self, hidden_states, args, kwargs)
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, **named)
    h = self.post_attention_layernorm(h)
    h, residual = add_norm(self.pre_feedforward_layernorm, h, hidden_states)
    h = self.post_feedforward_layernorm(self.mlp(h))
    return residual + h


def install(module_name: str, causal_lm_name: str) -> None:
    """Wraps the architecture's norm, MLP, layer and RoPE (once per process; inert until a
    patched model with the backbone on runs its training forward)."""
    if module_name in _installed:
        return
    mod = importlib.import_module(module_name)
    prefix = causal_lm_name.removesuffix("ForCausalLM")
    layer = _gemma2_layer if prefix == "Gemma2" else _llama_layer
    for cls_name, fused in ((f"{prefix}RMSNorm", _norm_forward), (f"{prefix}MLP", _mlp_forward),
                            (f"{prefix}DecoderLayer", layer)):
        cls = getattr(mod, cls_name)
        if not hasattr(cls.forward, "__ptcore_backbone_original__"):
            cls.forward = _gated(cls.forward, fused)
    if not hasattr(mod.apply_rotary_pos_emb, "__ptcore_backbone_original__"):
        mod.apply_rotary_pos_emb = _gated(mod.apply_rotary_pos_emb, _rope_fn)
    _installed.add(module_name)


def is_fused(cls) -> bool:
    """Whether ``cls.forward`` carries the backbone gate (for tests and ``ptcore info``)."""
    return hasattr(cls.forward, "__ptcore_backbone_original__")


__all__ = ["active", "add_norm", "enabled", "install", "is_active", "is_fused"]
