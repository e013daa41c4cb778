"""DPO: reference log-probs computed once and cached; the fused loss (through ptcore.patch) equals
the unfused composition (logits -> log-softmax -> sequence sums -> ptcore.ops.dpo_loss)."""
import copy

import pytest
import torch

from ptcore.ops import dpo_loss
from ptcore.ops.preference import LENGTH_NORMALIZED, LOSS_TYPES
from ptcore.train import data as D
from ptcore.train import dpo as dpo_module
from ptcore.train import run_dpo
from ptcore.train.config import DPOConfig
from ptcore.train.distributed import DistContext
from tests.hf_float64 import float64_norms
from tests.reference import assert_rule
from tests.train_helpers import config, one_thread, tiny  # noqa: F401

ROWS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
        for a, b in [(12, 7), (3, 45), (100, 23), (8, 8), (61, 5), (9, 90)]]


def unfused_seq_logps(model, batch, acc=torch.float64):
    """Sum over completion tokens of log_softmax(logits)[target], straight from the logits, the
    log-softmax and the sum in ``acc`` (float32 with an fp32 model: the plain fp32 computation)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["target"]
    lp = torch.log_softmax(logits.to(acc), -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return torch.where(tgt != -100, lp, 0).sum(-1), (tgt != -100).sum(-1)


def test_reference_computed_once_and_cached(tmp_path, monkeypatch):
    calls = []
    real = dpo_module.sequence_logps
    monkeypatch.setattr(dpo_module, "sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tok = tiny()
    initial, _ = tiny()
    res = run_dpo(model, None, tok, ROWS, config(tmp_path, "d", max_steps=4, batch_size=2, save_every=2))
    assert len(calls) == 3  # ceil(6 pairs / batch 2), once for the run, not per step
    cached = torch.load(tmp_path / "d" / "ref_logps.pt")["ref_logps"]
    # the cache holds the initial (frozen) model's log-probs, not the trained one's
    pairs = D.pair_examples(D.load_records(ROWS, "dpo"), tok, 48, report=False)
    # the cache (fp32 model, fused fp32 log-probs) against the float64 model's log-probs under the
    # tolerance rule, the naive baseline being the plain fp32 forward, log-softmax and sum
    batch = dpo_module.pair_batch(pairs, tok.pad_token_id)
    with torch.no_grad():
        ref64, _ = unfused_seq_logps(copy.deepcopy(initial).double(), batch)
        naive, _ = unfused_seq_logps(initial, batch, acc=torch.float32)
    assert ref64.dtype == torch.float64 and naive.dtype == torch.float32
    assert_rule(cached[:, 0], ref64[:6], naive[:6], "cached chosen log-probs", dtype=torch.float32)
    assert_rule(cached[:, 1], ref64[6:], naive[6:], "cached rejected log-probs", dtype=torch.float32)
    assert res.metrics[0]["accuracy"] == 0.0 and res.metrics[0]["margin"] == 0.0  # policy == ref at step 1
    # a resumed run reads the cache instead of recomputing with the trained model
    calls.clear()
    model, tok = tiny(seed=3)
    run_dpo(model, None, tok, ROWS, config(tmp_path, "d", max_steps=5, batch_size=2, resume=True))
    assert calls == []


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo", "hinge", "apo_zero", "bco_pair"])
def test_fused_loss_equals_unfused(loss_type):
    model, tok = tiny(dtype=torch.float64)
    ref, _ = tiny(seed=1, dtype=torch.float64)
    pairs = D.pair_examples(D.load_records(ROWS, "dpo"), tok, 48, report=False)
    cfg = DPOConfig(output_dir="/nonexistent", batch_size=3, max_length=48, seed=0, loss_type=loss_type, beta=0.5)
    obj = dpo_module.DPOObjective(pairs, tok, cfg, ref_model=ref)
    obj.prepare_model(model)
    obj.ctx = DistContext(rank=1)  # not the main rank: nothing written to output_dir
    if obj.needs_ref:
        obj.ref_logps = obj.compute_reference(model)
    mb, = [b for b in obj.micro_batches(0, model)][:1]
    loss, metrics = obj.loss(model, mb, global_units=6)  # this micro-batch is half of the pairs
    loss.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    with float64_norms():  # HF's norms upcast to fp32; ptcore's fused ones stay in float64
        with torch.no_grad():
            ref_lp, _ = unfused_seq_logps(ref, mb)
        lp, lengths = unfused_seq_logps(model, mb)
    B = 3
    kw = dict(chosen_lengths=lengths[:B], rejected_lengths=lengths[B:]) if loss_type in LENGTH_NORMALIZED else {}
    refs = (ref_lp[:B], ref_lp[B:]) if loss_type not in ("simpo", "orpo") else (None, None)
    plain = dpo_loss(lp[:B], lp[B:], *refs, beta=0.5, loss_type=loss_type, **kw)
    (plain.loss * 0.5).backward()
    torch.testing.assert_close(loss, plain.loss * 0.5, rtol=1e-8, atol=1e-10)
    assert metrics["accuracy"] == pytest.approx(float(plain.metrics["accuracy"]))
    # float64 model and float64 unfused composition (float64 norms): fixed float64 bounds, as for
    # the loss above; the tolerance rule is for the lower precisions
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for g, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-10)
    assert loss_type in LOSS_TYPES
