"""ptcore.patch on tiny randomly initialized Hugging Face models of every supported architecture:
the fused loss and every parameter's gradient against a float64 oracle computed from the unpatched
model's logits (tolerance rule: docs/kernels.md §4), Hugging Face's own loss
semantics (shift, -100, num_items_in_batch), identical generation, the head_loss path, patch_class,
unpatch, and clear errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import ptcore
from ptcore.ops import linear_logprobs, linear_policy_loss, policy_loss
from ptcore.patching import SUPPORTED, is_patched, unpatch_class
from tests.conftest import cpu_backends
from tests.reference import assert_rule, rel_err

V = 389  # odd on purpose
ARCHS = {  # per-architecture overrides of the tiny config (the rest below)
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "mistral": dict(head_dim=16, sliding_window=6),
    "gemma2": dict(head_dim=16, final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    "phi3": dict(),
}


def tiny_model(arch, dtype=torch.float64, seed=0):
    cfg = AutoConfig.for_model(arch, vocab_size=V, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **ARCHS[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    for p in model.parameters():  # larger than HF's init, so that the logits are far from uniform
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)  # the same values in every dtype


def batch(B=3, T=11):
    ids = torch.randint(3, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, -4:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :3] = -100  # prompts
    labels[mask == 0] = -100
    return ids, mask, labels


def reference_loss(model64, ids, mask, labels, num_items=None, dtype=None):
    """float64: the unpatched model's logits, shifted cross-entropy written out here (``dtype``:
    the logits cast to it first, e.g. float32 for the naive baseline of the tolerance rule)."""
    logits = model64(ids, attention_mask=mask).logits
    logits = logits if dtype is None else logits.to(dtype)
    target = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, V), target, ignore_index=-100, reduction="none")
    return losses.sum() / (num_items if num_items is not None else (target != -100).sum())


def loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_supported_table():
    assert set(SUPPORTED) >= set(ARCHS) and ptcore.patch.SUPPORTED is SUPPORTED


@pytest.mark.parametrize("arch,case", [(a, c) for a in ARCHS for c in ("mean", "num_items")]
                         + [("llama", "shift_labels"), ("gemma2", "shift_labels")])
def test_float64_loss_and_grads_match(arch, case):
    ref = tiny_model(arch)
    model = ptcore.patch(copy.deepcopy(ref))
    ids, mask, labels = batch()
    num_items = int((labels[:, 1:] != -100).sum()) * 2 if case == "num_items" else None
    if num_items is not None and arch in ("llama", "gemma2"):
        num_items = torch.tensor(num_items)  # Trainer passes a tensor; custom loops often an int
    want, want_g = loss_and_grads(ref, reference_loss(ref, ids, mask, labels, num_items))
    kw = dict(num_items_in_batch=num_items) if num_items is not None else {}
    if case == "shift_labels":  # pre-shifted labels (sequence parallelism): same loss
        kw["shift_labels"] = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    out = model(ids, attention_mask=mask, labels=labels, **kw)
    hook.remove()
    assert not calls and out.logits is None and out.loss.dtype == torch.float64  # no logits
    got, got_g = loss_and_grads(model, out.loss)
    assert rel_err(got, want) < 1e-10
    assert got_g.keys() == want_g.keys() and len(got_g) == len(list(model.parameters()))
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) < 1e-9, name
    # Hugging Face's own loss (computed in fp32 from the logits) has the same semantics: within the
    # tolerance rule of the float64 loss, the naive baseline being the same loss from fp32 logits.
    hf = ref(ids, attention_mask=mask, labels=labels, **kw).loss.detach()
    with torch.no_grad():
        naive = reference_loss(ref, ids, mask, labels, num_items, dtype=torch.float32)
    assert_rule(hf, want, naive, "Hugging Face loss", dtype=torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fp32_within_tolerance(arch, backend):
    ref = tiny_model(arch)
    model = ptcore.patch(tiny_model(arch, torch.float32))
    ids, mask, labels = batch()
    want, want_g = loss_and_grads(ref, reference_loss(ref, ids, mask, labels))
    naive_model = tiny_model(arch, torch.float32)  # the unpatched fp32 model: the rule's baseline
    naive, naive_g = loss_and_grads(naive_model, reference_loss(naive_model, ids, mask, labels))
    with ptcore.use_backend(backend):
        got, got_g = loss_and_grads(model, model(ids, attention_mask=mask, labels=labels).loss)
    assert got.dtype == torch.float32
    assert_rule(got, want, naive, "loss")
    for name in want_g:
        assert_rule(got_g[name], want_g[name], naive_g[name], name)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bf16_criterion(arch):
    """Error vs float64 <= the unpatched bf16 model's error + 1e-2 (relative)."""
    ref = tiny_model(arch)
    naive = tiny_model(arch, torch.bfloat16)
    model = ptcore.patch(copy.deepcopy(naive))
    ids, mask, labels = batch()
    want, want_g = loss_and_grads(ref, reference_loss(ref, ids, mask, labels))
    base, base_g = loss_and_grads(naive, naive(ids, attention_mask=mask, labels=labels).loss)
    got, got_g = loss_and_grads(model, model(ids, attention_mask=mask, labels=labels).loss)
    assert got.dtype == torch.float32  # as Hugging Face's loss
    assert rel_err(got, want) <= rel_err(base, want) + 1e-2
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) <= rel_err(base_g[name], want_g[name]) + 1e-2, name


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_and_inference_untouched(arch):
    ref = tiny_model(arch, torch.float32)
    model = ptcore.patch(copy.deepcopy(ref))
    ids, mask, _ = batch(B=2, T=6)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    opts = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **opts), ref.generate(ids, **opts))


def sequence_logps_from_logits(model64, ids, mask, target):
    logits = model64(ids, attention_mask=mask).logits  # includes Gemma 2's soft-capping
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(target != -100, logp, torch.zeros((), dtype=logp.dtype))


@pytest.mark.parametrize("arch", ARCHS)
def test_head_loss_log_probs(arch):
    ref = tiny_model(arch)
    model = ptcore.patch(copy.deepcopy(ref))
    ids, mask, labels = batch()
    target = F.pad(labels, (0, 1), value=-100)[:, 1:]
    weights = torch.randn(ids.shape[0], dtype=torch.float64)
    want, want_g = loss_and_grads(ref, (sequence_logps_from_logits(ref, ids, mask, target).sum(-1) * weights).sum())

    def head(hidden, weight, softcap):
        assert hidden.shape == (*ids.shape, 64) and weight.shape == (V, 64)
        return (linear_logprobs(hidden, weight, target, softcap=softcap).sum(-1) * weights).sum()

    out = model(ids, attention_mask=mask, head_loss=head)
    assert out.logits is None and out.head_output is out.loss
    got, got_g = loss_and_grads(model, out.loss)
    assert rel_err(got, want) < 1e-10
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) < 1e-9, name


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_head_loss_policy(arch):
    """The GRPO use: linear_policy_loss inside forward; head_output keeps its metrics."""
    ref = tiny_model(arch)
    model = ptcore.patch(copy.deepcopy(ref))
    ids, mask, labels = batch()
    target = F.pad(labels, (0, 1), value=-100)[:, 1:]
    comp = (target != -100).double()
    old = (sequence_logps_from_logits(ref, ids, mask, target) + 0.05 * torch.randn(target.shape)).detach()
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    logps = sequence_logps_from_logits(ref, ids, mask, target)
    want, want_g = loss_and_grads(ref, policy_loss(logps, old, adv, comp, loss_type="grpo").loss)
    out = model(ids, attention_mask=mask, head_loss=lambda h, w, c: linear_policy_loss(
        h, w, target, old, adv, comp, softcap=c, loss_type="grpo"))
    assert "entropy" in out.head_output.metrics and out.loss is out.head_output.loss
    got, got_g = loss_and_grads(model, out.loss)
    assert rel_err(got, want) < 1e-10
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) < 1e-9, name


def test_patch_is_idempotent_and_unpatch_restores():
    ref = tiny_model("qwen2")
    model = copy.deepcopy(ref)
    ids, mask, labels = batch()
    assert ptcore.patch(model) is model and is_patched(model)
    forward = model.forward
    ptcore.patch(model)
    assert model.forward == forward and type(model) is type(ref)  # the class is unchanged
    clone = copy.deepcopy(model)  # a copy stays patched, bound to itself
    assert is_patched(clone) and clone.forward.__self__ is clone
    assert ptcore.unpatch(model) is model and not is_patched(model) and "forward" not in model.__dict__
    out, want = model(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)


def test_patch_class():
    cls = type(tiny_model("mistral"))
    original = cls.forward
    ids, mask, labels = batch()
    try:
        assert ptcore.patch_class("mistral") is cls and ptcore.patch_class("MistralForCausalLM") is cls
        patched = cls.forward
        assert patched is not original and ptcore.patch_class("mistral").forward is patched
        model = tiny_model("mistral")  # built after patching: patched
        assert is_patched(model) and model(ids, labels=labels).logits is None
        assert model(ids).logits is not None
        ptcore.unpatch(model)  # this instance only
        assert not is_patched(model) and model(ids, labels=labels).logits is not None
        ptcore.patch(model)
        assert is_patched(model)
        other = tiny_model("mistral")
        unpatch_class("mistral")
        assert cls.forward is original and not is_patched(other)
        assert is_patched(model)  # given to patch(): stays patched
    finally:
        unpatch_class("mistral")
    assert cls.forward is original


def test_unsupported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*gemma2.*llama.*mistral.*phi3.*qwen2.*qwen3"):
        ptcore.patch(gpt2)
    with pytest.raises(ValueError, match="'gpt2'.*supported architectures: gemma2, llama"):
        ptcore.patch_class("gpt2")
    with pytest.raises(TypeError, match="name"):
        ptcore.patch_class(None)
    with pytest.raises(ValueError, match="supported"):
        ptcore.patch(torch.nn.Linear(2, 2))


def test_return_dict_false():
    model = ptcore.patch(tiny_model("llama"))
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].ndim == 0


def test_bad_input():
    model = ptcore.patch(tiny_model("llama"))
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="'labels' of shape \\(3, 10\\) do not match .*\\(3, 11\\)"):
        model(ids, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="'shift_labels' of shape \\(3, 12\\) do not match"):
        model(ids, labels=labels, shift_labels=F.pad(labels, (0, 1)))
    with pytest.raises(ValueError, match="'labels' must hold integer"):
        model(ids, labels=labels.double())
    with pytest.raises(TypeError, match="'labels' must be a torch.Tensor"):
        model(ids, labels=labels.tolist())
    with pytest.raises(ValueError, match="out of range|target"):
        model(ids, labels=torch.full_like(labels, V))
    with pytest.raises(ValueError, match="either 'labels'.*or 'head_loss'"):
        model(ids, labels=labels, head_loss=lambda h, w, c: h.sum())
    with pytest.raises(TypeError, match="'head_loss' must be callable"):
        model(ids, head_loss=3)
    with pytest.raises(TypeError, match="'head_loss' must return a tensor"):
        model(ids, head_loss=lambda h, w, c: 1.0)


def test_autocast_bf16():
    """Under autocast the head runs in the autocast dtype, as lm_head would; gradients reach the
    fp32 parameters; the error criterion is the bf16 one against the unpatched autocast model."""
    ref = tiny_model("qwen3")
    naive = tiny_model("qwen3", torch.float32)
    model = ptcore.patch(copy.deepcopy(naive))
    ids, mask, labels = batch()
    want, want_g = loss_and_grads(ref, reference_loss(ref, ids, mask, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = naive(ids, attention_mask=mask, labels=labels).loss
        out = model(ids, attention_mask=mask, labels=labels)
        seen = model(ids, head_loss=lambda h, w, c: h.new_zeros(()) if (h.dtype, w.dtype) == (
            torch.bfloat16, torch.bfloat16) else None)
    assert seen.loss is not None  # head_loss got the autocast dtype too
    base, base_g = loss_and_grads(naive, base)
    got, got_g = loss_and_grads(model, out.loss)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_g.values())
    assert rel_err(got, want) <= rel_err(base, want) + 1e-2
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) <= rel_err(base_g[name], want_g[name]) + 1e-2, name


# ---- the fused backbone (backbone=True, the default): RMSNorm + residual, RoPE, SwiGLU / GeGLU ----

from ptcore.patching import backbone as backbone_mod  # noqa: E402
from tests.hf_float64 import float64_norms  # noqa: E402


@pytest.fixture(autouse=True)
def _float64_norms():
    """Every float64 oracle here with Hugging Face's RMSNorm in float64 (tests/hf_float64.py says
    why): otherwise the unpatched float64 model is only fp32-accurate in its norms."""
    with float64_norms(ARCHS):
        yield


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused ops the patched layers call, by name."""
    calls = {}
    for name in ("rms_norm", "rope", "swiglu", "geglu"):
        fn = getattr(backbone_mod, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(backbone_mod, name, counted)
    return calls


def _expected_calls(arch, layers=2):
    per_layer_norms = 4 if arch == "gemma2" else 2
    per_layer_norms += 2 if arch == "qwen3" else 0  # q_norm, k_norm
    act = "geglu" if arch == "gemma2" else "swiglu"
    return {"rms_norm": per_layer_norms * layers + 1, "rope": layers, act: layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_float64_loss_and_grads_match_unpatched(arch, fused_calls):
    """Patched (fused norms with the residual add, RoPE, gated MLP) against the unpatched model,
    both float64: the loss and every parameter's gradient within 1e-10."""
    ref = tiny_model(arch)
    model = ptcore.patch(copy.deepcopy(ref))
    ids, mask, labels = batch()
    want, want_g = loss_and_grads(ref, reference_loss(ref, ids, mask, labels))  # HF's loss is fp32
    assert not fused_calls  # the unpatched model runs Hugging Face's code
    got, got_g = loss_and_grads(model, model(ids, attention_mask=mask, labels=labels).loss)
    assert fused_calls == _expected_calls(arch)
    assert rel_err(got, want) < 1e-10
    assert got_g.keys() == want_g.keys() and len(got_g) == len(list(model.parameters()))
    for name in want_g:
        assert rel_err(got_g[name], want_g[name]) < 1e-10, name


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_fp32_within_tolerance(arch, fused_calls):
    """fp32 patched model vs the float64 model under the tolerance rule, the naive baseline being
    the unpatched fp32 model (loss and every gradient)."""
    ref = tiny_model(arch)
    model = ptcore.patch(tiny_model(arch, torch.float32))
    ids, mask, labels = batch()
    want, want_g = loss_and_grads(ref, reference_loss(ref, ids, mask, labels))
    naive_model = tiny_model(arch, torch.float32)
    naive, naive_g = loss_and_grads(naive_model, reference_loss(naive_model, ids, mask, labels))
    got, got_g = loss_and_grads(model, model(ids, attention_mask=mask, labels=labels).loss)
    assert fused_calls == _expected_calls(arch)
    assert_rule(got, want, naive, "loss")
    for name in want_g:
        assert_rule(got_g[name], want_g[name], naive_g[name], name)


def test_backbone_off_and_outside_training(fused_calls):
    ids, mask, labels = batch()
    model = ptcore.patch(tiny_model("llama"), backbone=False)
    model(ids, attention_mask=mask, labels=labels)
    assert not fused_calls  # backbone=False: only the fused head
    model = ptcore.patch(tiny_model("gemma2"))
    model(ids, attention_mask=mask)  # inference: Hugging Face's code
    model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert not fused_calls
    model(ids, attention_mask=mask, head_loss=lambda h, w, c: h.sum())  # the RL path fuses too
    assert fused_calls == _expected_calls("gemma2")
    with pytest.raises(TypeError, match="'backbone' must be True or False"):
        ptcore.patch(model, backbone="yes")


def test_backbone_off_under_gradient_checkpointing(fused_calls):
    """The recomputation in backward runs outside the patched forward, so a checkpointed model
    keeps Hugging Face's layers (the same code in the forward and its recomputation)."""
    model = ptcore.patch(tiny_model("llama"))
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert not fused_calls
