"""ptcore.integrations.verl.linear_cross_entropy, called the way verl's actors call their own
(``forward_with_triton_backend``: final hidden states, the LM-head weight, the input ids rolled
left by one, the temperature and "none" positionally; the no-padding path's ``(1, total_nnz)``
squeezed, the padded path's ``(B, T)`` sliced to the response). verl is not installed: the oracle
is the definition verl's unfused path computes (``logprobs_from_logits`` and
``entropy_from_logits`` on ``logits / temperature``), here on the full logits in float64.
"""
import inspect

import pytest
import torch

from ptcore.integrations.verl import linear_cross_entropy
from tests.reference import assert_rule, rel_err


def tiny(dtype=torch.float64):
    from ptcore.train.tiny import tiny_config
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.3)
    return LlamaForCausalLM(cfg).to(dtype)


def verl_unfused(logits, labels, temperature):
    """verl's torch path: log-softmax gathered at the labels, and the entropy of the softmax."""
    z = logits / temperature
    logp = torch.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]
    entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


def test_signature_is_verls():
    params = inspect.signature(linear_cross_entropy).parameters
    assert list(params) == ["hidden", "weight", "labels", "temperature", "reduction", "dist_process_group"]
    assert [params[n].default for n in ("temperature", "reduction", "dist_process_group")] == [1.0, "none", None]


@pytest.mark.parametrize("layout", ["rmpad", "padded"])
def test_as_verl_calls_it_float64(layout):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 13) if layout == "rmpad" else (3, 9), generator=g)
    hidden = model.model(input_ids=ids).last_hidden_state
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    log_probs, entropy = linear_cross_entropy(hidden, model.lm_head.weight, rolled, 0.7, "none")
    assert log_probs.shape == entropy.shape == ids.shape and log_probs.dtype == torch.float64
    want_lp, want_ent = verl_unfused(model.lm_head(hidden), rolled, 0.7)
    assert rel_err(log_probs, want_lp) < 1e-12 and rel_err(entropy, want_ent) < 1e-12
    if layout == "rmpad":
        log_probs, entropy = log_probs.squeeze(0), entropy.squeeze(0)  # (total_nnz,), as dp_actor reads them
        assert log_probs.shape == (13,)
    else:
        log_probs, entropy = log_probs[:, -4 - 1:-1], entropy[:, -4 - 1:-1]  # the response's positions
    # a PPO-style objective: both outputs carry gradients to the model
    adv = torch.randn(log_probs.shape, generator=g, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad(-(adv * log_probs).sum() - 0.01 * entropy.sum(), params)
    hidden = model.model(input_ids=ids).last_hidden_state
    lp, ent = verl_unfused(model.lm_head(hidden), rolled, 0.7)
    lp, ent = (lp.squeeze(0), ent.squeeze(0)) if layout == "rmpad" else (lp[:, -5:-1], ent[:, -5:-1])
    want = torch.autograd.grad(-(adv * lp).sum() - 0.01 * ent.sum(), params)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-10


def test_float32_under_the_rule():
    model = tiny(torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    got = linear_cross_entropy(hidden, model.lm_head.weight.detach(), rolled, 1.0)
    assert got[0].dtype == got[1].dtype == torch.float32
    ref = verl_unfused(hidden.double() @ model.lm_head.weight.detach().double().T, rolled, 1.0)
    naive = verl_unfused(hidden @ model.lm_head.weight.detach().T, rolled, 1.0)
    for what, i in (("log_probs", 0), ("entropy", 1)):
        assert_rule(got[i], ref[i], naive[i], what=what)


def test_what_it_cannot_do_is_named():
    h, w, y = torch.randn(1, 4, 8), torch.randn(20, 8), torch.randint(0, 20, (1, 4))
    with pytest.raises(ValueError, match="'reduction'"):
        linear_cross_entropy(h, w, y, 1.0, "mean")
    with pytest.raises(TypeError, match="'temperature'"):
        linear_cross_entropy(h, w, y, "0.7")
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy(h, w, y, 0.0)
    with pytest.raises(ValueError, match="'labels' must have shape"):
        linear_cross_entropy(h, w, y[:, :3])
    with pytest.raises(TypeError, match="'labels'"):
        linear_cross_entropy(h, w, [1, 2, 3, 4])
    with pytest.raises(TypeError, match="'weight'"):
        linear_cross_entropy(h, w.double(), y)
