"""The engine's compact decoder forward: Llama / Qwen2 / Qwen3 / Mistral weights read from a Hugging
Face causal LM, run over packed tokens of many sequences (no padding), with attention delegated
to a callable (the engine's paged KV cache).

The numerics follow Hugging Face's on purpose (RMSNorm in fp32 then cast back, RoPE angles in fp32),
so that float64 runs agree with the HF forward to rounding and greedy outputs agree token for token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants whose inverse frequencies do not depend on the sequence length: the model's own
# precomputed ``inv_freq`` and ``attention_scaling`` describe them completely.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def load_hf_model(model, dtype=None, device=None):
    """An HF causal LM object, or a local path loaded with AutoModelForCausalLM (no download)."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_dir():
            raise ValueError(f"Engine: 'model' path {str(model)!r} is not a local directory")
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"Engine: 'model' must be a Hugging Face causal LM or a local path, got {type(model).__name__}")
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and "rope_type" not in params and "type" not in params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("Engine: per-layer-type RoPE parameters are not supported")
    return params.get("rope_type", params.get("type", "default")) if params else "default"


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: list            # [(weight, bias)] for q, k, v; or one fused (weight, bias)
    o: tuple
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    gate_up: list        # [(weight, bias)] for gate, up; or one fused
    down: tuple


def _fuse(linears, fuse: bool) -> list:
    """[(weight, bias)] of the linears, or one concatenated (weight, bias) when ``fuse``: one GEMM
    instead of several (fewer small ops per layer, which is what a small model's decode step is
    made of), at the cost of a copy of those weights."""
    pairs = [(_w(m), _b(m)) for m in linears]
    if not fuse:
        return pairs
    w = torch.cat([p[0] for p in pairs])
    if all(p[1] is None for p in pairs):
        return [(w, None)]
    b = torch.cat([p[1] if p[1] is not None else torch.zeros(p[0].shape[0], dtype=w.dtype, device=w.device)
                   for p in pairs])
    return [(w, b)]


def _w(linear):
    return linear.weight.detach()


def _b(linear):
    return None if linear.bias is None else linear.bias.detach()


class CompactModel:
    """Weights (shared with the HF module, not copied) and a packed forward.

    ``forward(input_ids [T], positions [T], attention, select)``: ``attention(layer, q, k, v)``
    gets ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` after RoPE and returns ``[T, Hq, D]``; logits are
    computed only for the rows in ``select`` (last token per sequence, or all of them).
    """

    def __init__(self, hf_model, fuse_weights: bool | None = None):
        config = hf_model.config
        mtype = getattr(config, "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"Engine: model_type {mtype!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        self.config = config
        self.model_type = mtype
        body = hf_model.model
        rope = body.rotary_emb
        rtype = _rope_type(config)
        if rtype not in STATIC_ROPE_TYPES:
            raise ValueError(f"Engine: rope type {rtype!r} is not supported (its frequencies depend on the "
                             f"sequence length); supported: {STATIC_ROPE_TYPES}")
        self.inv_freq = rope.inv_freq.detach().float()
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        attn0 = body.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.scale = float(attn0.scaling)
        self.num_layers = len(body.layers)
        self.vocab_size = int(hf_model.get_output_embeddings().weight.shape[0])
        self.embed = body.embed_tokens.weight.detach()
        self.norm = body.norm.weight.detach()
        self.eps = float(config.rms_norm_eps)
        self.lm_head = hf_model.get_output_embeddings().weight.detach()
        self.lm_head_bias = _b(hf_model.get_output_embeddings())
        from transformers.activations import ACT2FN
        self.act = ACT2FN[config.hidden_act]
        self.window = self._sliding_window(config)
        if fuse_weights is None:  # small models: per-op overhead dominates, the copy is cheap
            fuse_weights = sum(p.numel() for p in hf_model.parameters()) < 200_000_000
        self.fused = bool(fuse_weights)
        self.layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            qn = getattr(a, "q_norm", None)
            kn = getattr(a, "k_norm", None)
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                qkv=_fuse([a.q_proj, a.k_proj, a.v_proj], self.fused), o=(_w(a.o_proj), _b(a.o_proj)),
                q_norm=None if qn is None else qn.weight.detach(), k_norm=None if kn is None else kn.weight.detach(),
                gate_up=_fuse([m.gate_proj, m.up_proj], self.fused), down=(_w(m.down_proj), _b(m.down_proj))))
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self._cos = self._sin = None

    @staticmethod
    def _sliding_window(config) -> int | None:
        """The smallest sliding window any layer uses (None: full attention everywhere). The engine
        runs full attention, which equals sliding-window attention while no sequence is longer than
        the window; it raises past that instead of silently diverging."""
        window = getattr(config, "sliding_window", None)
        if not window:
            return None
        types = getattr(config, "layer_types", None)
        if types is not None and "sliding_attention" not in types:
            return None
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window)

    # -- numerics shared with Hugging Face -------------------------------------------------------
    def _rms(self, x, w):
        """Hugging Face's RMSNorm: normalized in fp32, cast back, then scaled by the weight."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _rope_tables(self, max_pos: int):
        if self._cos is None or self._cos.shape[0] < max_pos:
            n = max(max_pos, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            pos = torch.arange(n, device=self.device).float()
            freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self.rope_scale).to(self.dtype)
            self._sin = (emb.sin() * self.rope_scale).to(self.dtype)
        return self._cos, self._sin

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    # -- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention, select: torch.Tensor | None):
        T = input_ids.shape[0]
        cos, sin = self._rope_tables(int(positions.max()) + 1 if T else 1)
        cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]
        x = F.embedding(input_ids, self.embed)
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        for i, L in enumerate(self.layers):
            h = self._rms(x, L.ln1)
            if len(L.qkv) == 1:
                qkv = F.linear(h, *L.qkv[0]).view(T, Hq + 2 * Hkv, D)
                q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
            else:
                q, k, v = (F.linear(h, w, b).view(T, -1, D) for w, b in L.qkv)
            if L.q_norm is not None:
                q, k = self._rms(q, L.q_norm), self._rms(k, L.k_norm)
                qk = torch.cat([q, k], dim=1)
            elif len(L.qkv) == 1:
                qk = qkv[:, :Hq + Hkv]  # q and k are adjacent in the fused projection
            else:
                qk = torch.cat([q, k], dim=1)
            qk = self._rotate(qk, cos, sin)  # one rotation for q and k
            # strided views, no copies: the paged ops read rows through their strides
            o = attention(i, qk[:, :Hq], qk[:, Hq:], v)
            x = x + F.linear(o.reshape(T, Hq * D), *L.o)
            h = self._rms(x, L.ln2)
            if len(L.gate_up) == 1:
                gate, up = F.linear(h, *L.gate_up[0]).chunk(2, dim=-1)
            else:
                gate, up = (F.linear(h, w, b) for w, b in L.gate_up)
            x = x + F.linear(self.act(gate) * up, *L.down)
        if select is not None:
            x = x[select]
        x = self._rms(x, self.norm)
        return F.linear(x, self.lm_head, self.lm_head_bias)
