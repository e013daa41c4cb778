"""GRPOConfig.min_new_tokens (Hugging Face's meaning: EOS cannot end a completion before that many
new tokens) on both rollout paths, its checks, and its CLI flag.

The tiny model is made to want EOS at every position (a constant residual direction that only the
EOS row of the LM head reads), so without min_new_tokens completions end after a token or two:
the option is what keeps them long."""
import pytest
import torch

from ptcore.train.config import GRPOConfig
from ptcore.train.data import load_records, prompt_examples
from ptcore.train.grpo import GRPOObjective
from tests.train_helpers import one_thread, tiny  # noqa: F401

DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (500, 61), (7, 7)]]
MAX_NEW = 8


def zero_reward(prompts, completions, **_):
    return [0.0] * len(completions)


def eos_loving_tiny():
    """The tiny model with EOS its most likely next token everywhere: every embedding gets a large
    dimension 0, so the final norm's output is large and positive there, and only EOS's LM-head
    row reads it."""
    model, tok = tiny()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.eos_token_id, 0] = 3.0
    return model, tok


def completions(tmp_path, rollout, min_new_tokens, seed=0):
    """Each completion's kept tokens (up to and including its EOS) from one rollout, the sampler's
    log-probs of them, and the eos id."""
    model, tok = eos_loving_tiny()
    prompts = prompt_examples(load_records(DATA, "grpo"), tok, 32, report=False)
    cfg = GRPOConfig(output_dir=str(tmp_path / f"{rollout}{min_new_tokens}"), batch_size=4, max_length=48,
                     seed=seed, group_size=3, temperature=1.0, max_new_tokens=MAX_NEW,
                     min_new_tokens=min_new_tokens, rollout=rollout)
    obj = GRPOObjective(prompts, tok, cfg, reward_fns=[zero_reward])
    obj.prepare_model(model)
    obj.setup(model, obj.ctx, cfg)
    torch.manual_seed(seed)  # HF generate samples from torch's global generator
    b = obj.make_rollout(model, prompts)
    P = max(len(p["prompt"]) for p in prompts)
    comp, cmask, logps = b["input_ids"][:, P:], b["attention_mask"][:, P:].bool(), b["sampling_logps"][:, P - 1:]
    if obj.engine is not None:  # every page back in the pool
        assert not obj.engine.cache.running and obj.engine.pool.num_free == obj.engine.pool.num_pages
    return [(c[m].tolist(), lp[:c.shape[0]][m]) for c, m, lp in zip(comp, cmask, logps)], tok.eos_token_id


@pytest.mark.parametrize("rollout", ["engine", "hf"])
def test_completions_reach_min_new_tokens(tmp_path, rollout):
    short, eos = completions(tmp_path, rollout, 0)
    # the premise: without the option, EOS ends the completions early
    assert all(len(t) < 3 and t[-1] == eos for t, _ in short), [t for t, _ in short]
    for m in (5, MAX_NEW):
        rows, eos = completions(tmp_path, rollout, m)
        assert len(rows) == 12
        for toks, lps in rows:
            assert len(toks) >= m, (m, toks)
            assert eos not in toks[:m], (m, toks)  # suppressed, not sampled and then overwritten
            assert torch.isfinite(lps).all() and (lps <= 0).all()
            if m < MAX_NEW:  # the model still wants EOS: it comes as soon as it is allowed
                assert toks[m] == eos and len(toks) == m + 1, (m, toks)
            else:
                assert len(toks) == MAX_NEW


@pytest.mark.parametrize("value", [-1, 1.5, True, "2", MAX_NEW + 1])
def test_bad_min_new_tokens_names_the_option(tmp_path, value):
    with pytest.raises(ValueError, match="min_new_tokens"):
        GRPOConfig(output_dir=str(tmp_path), max_new_tokens=MAX_NEW, min_new_tokens=value)


def test_cli_flag(tmp_path, capsys):
    from ptcore.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    assert "--min-new-tokens" in capsys.readouterr().out
    args = ["grpo", "--task", "addition", "--output", str(tmp_path / "g"), "--max-steps", "1", "--batch-size", "2",
            "--max-length", "48", "--no-progress", "--num-examples", "8", "--group-size", "2",
            "--max-new-tokens", "4", "--min-new-tokens", "5"]
    assert main(args) == 2
    assert "--min-new-tokens must be <= max_new_tokens (4), got 5" in capsys.readouterr().err
