"""The real model, SmolLM2-135M-Instruct (fp32, CPU): ptcore.patch's loss and gradients, the
engine's greedy tokens and sampling log-probs against Hugging Face, SFT lowering held-out loss.

Marker ``real``; the model is loaded once per module from the cache. Without a cached copy every
test here skips, saying to run ``ptcore models fetch smollm2-135m-instruct`` (CI's set-up does).
Kept short (few prompts, short sequences) so the file runs in a few minutes on 2 cores.
"""
import copy
import time

import pytest
import torch
import torch.nn.functional as F

import ptcore
from ptcore import models as M
from ptcore.models.chat import OPEN_PROMPTS, addition_sft, conversations
from ptcore.train.data import load_records, pad_examples, sft_examples
from tests.reference import assert_rule, rel_err, rule_bound

NAME = "smollm2-135m-instruct"
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    if not M.is_cached(NAME):
        pytest.skip(f"{NAME} is not in the cache ({M.model_dir(NAME)}): run "
                    f"`ptcore models fetch {NAME}` (CI's set-up does)")
    t = time.perf_counter()
    model, tok = M.load(NAME, fetch_missing=False)
    print(f"\n{NAME}: loaded in {time.perf_counter() - t:.1f} s")
    return model.eval(), tok


def chat_ids(tok, prompt):
    return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def padded_batch(tok, records, max_length=128):
    ex = sft_examples(load_records(records, "sft"), tok, max_length)
    b = {k: torch.tensor(v) for k, v in pad_examples(ex, tok.pad_token_id).items()}
    return b["input_ids"], b["attention_mask"], b["labels"]


def shifted_ce(logits, labels):
    target = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target, ignore_index=-100,
                             reduction="none")
    return losses.sum() / (target != -100).sum()


def loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_tied_checkpoint(real):
    model, tok = real
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 134.5) < 0.1
    assert tok.chat_template and tok.pad_token_id is not None


def test_patch_fp32_loss_and_every_gradient(real):
    """Error vs float64 <= 2x the unpatched fp32 model's error vs float64 + 1e-6 (relative), for
    the loss and every parameter's gradient (the tied embedding/head included), on chat data."""
    model, tok = real
    ids, mask, labels = padded_batch(tok, conversations("train")[:1] + addition_sft(1))
    ref = copy.deepcopy(model).double().train()
    want, want_g = loss_and_grads(ref, shifted_ce(ref(ids, attention_mask=mask).logits, labels))
    del ref
    base_model = copy.deepcopy(model).train()
    base, base_g = loss_and_grads(base_model, base_model(ids, attention_mask=mask, labels=labels).loss)
    del base_model
    patched = ptcore.patch(copy.deepcopy(model)).train()
    assert patched.lm_head.weight is patched.model.embed_tokens.weight  # still tied
    out = patched(ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the fused head: no logits
    got, got_g = loss_and_grads(patched, out.loss)
    assert rel_err(got, want) <= 2 * rel_err(base, want) + 1e-6
    assert got_g.keys() == want_g.keys() and len(got_g) == 272  # 30 x 9 + norm + the tied embedding/head
    worst = 0.0
    for name in want_g:
        e, b = rel_err(got_g[name], want_g[name]), rel_err(base_g[name], want_g[name])
        assert e <= 2 * b + 1e-6, (name, e, b)
        worst = max(worst, e / (2 * b + 1e-6))
    e = rel_err(got_g["model.embed_tokens.weight"], want_g["model.embed_tokens.weight"])
    print(f"\nloss rel err {rel_err(got, want):.2e} (unpatched {rel_err(base, want):.2e}); tied head "
          f"grad rel err {e:.2e}; worst gradient at {worst:.2f} of its bound")


def test_engine_greedy_equals_hf(real):
    """8 chat prompts, 32 new tokens each: the engine's greedy tokens are HF generate's."""
    from ptcore.engine import Engine, SamplingParams
    model, tok = real
    prompts = [chat_ids(tok, p) for p in OPEN_PROMPTS[:8]]
    new = 32
    eng = Engine(model, tokenizer=tok)
    got = [c[0].tokens for c in eng.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0))]
    P = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    want = []
    for row in out[:, P:].tolist():
        want.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    same = sum(g == w for g, w in zip(got, want))
    print(f"\nengine greedy == HF greedy on {same}/{len(prompts)} prompts of {new} new tokens")
    assert got == want
    assert all(len(g) == new for g in got)  # open prompts: none stops early


def test_engine_sampling_logprobs_match_hf_forward(real):
    """The engine's fp32 sampling log-probs against a float64 copy of the model under the tolerance
    rule, the naive baseline being the plain fp32 Hugging Face forward and log-softmax."""
    from ptcore.engine import Engine, SamplingParams
    model, tok = real
    prompts = [chat_ids(tok, p) for p in OPEN_PROMPTS[8:10]]
    eng = Engine(model, tokenizer=tok)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=0), n=2)
    model64 = copy.deepcopy(model).double()

    def logprobs(net, ids, n_prompt, tokens):
        with torch.no_grad():
            z = net(ids).logits[0, n_prompt - 1:-1]
        return z.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]

    worst = 0.0
    for p, comps in zip(prompts, outs):
        for c in comps:
            ids = torch.tensor([p + c.tokens])
            ref, naive = logprobs(model64, ids, len(p), c.tokens), logprobs(model, ids, len(p), c.tokens)
            assert ref.dtype == torch.float64 and naive.dtype == torch.float32
            got = torch.tensor(c.logprobs, dtype=torch.float32)
            assert_rule(got, ref, naive, "engine sampling log-probs")
            worst = max(worst, rel_err(got, ref) / rule_bound(naive, ref))
    del model64
    print(f"\nengine sampling log-probs vs a float64 copy of the model: worst error / rule bound {worst:.2f}")


def heldout_loss(model, tok, records) -> float:
    ids, mask, labels = padded_batch(tok, records)
    with torch.no_grad():
        return float(model(ids, attention_mask=mask, labels=labels).loss)


def test_sft_lowers_heldout_loss(real, tmp_path):
    from ptcore.train import SFTConfig, run_sft
    model, tok = real
    train = conversations("train")[:10] + addition_sft(14)
    heldout = conversations("heldout") + addition_sft(6, split="heldout")
    policy = copy.deepcopy(model)
    before = heldout_loss(policy, tok, heldout)
    cfg = SFTConfig(str(tmp_path), max_steps=3, batch_size=8, lr=5e-5, max_length=128, seed=0,
                    progress=False, save_final=False, packing=False)
    res = run_sft(policy, tok, train, cfg)
    after = heldout_loss(policy.eval(), tok, heldout)
    print(f"\nSFT, 3 steps of 8 chat examples: held-out loss {before:.3f} -> {after:.3f}")
    assert len(res.metrics) == 3 and after < before - 0.1
