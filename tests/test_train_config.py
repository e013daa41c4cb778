"""Issue 17, configs declared once: every option of SFTConfig / DPOConfig / GRPOConfig is a field
with its help text, the CLI parses those dataclasses with HfArgumentParser (every field a flag,
its help in --help, the older flag spellings and defaults kept), and the Python API takes the same
dataclasses (the old keyword options still work, with a DeprecationWarning)."""
import dataclasses
import warnings

import pytest

from ptcore.__main__ import main
from ptcore.train import DPOConfig, GRPOConfig, SFTConfig, TrainConfig, run_grpo
from ptcore.train.cli import CONFIGS, DEFAULTS, RUN_ARGS, _config, make_parser
from ptcore.train.config import objective_config
from tests.train_helpers import config, math_of, one_thread, tiny  # noqa: F401

KINDS = ("sft", "dpo", "grpo")


def flag(name):
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_a_flag_with_its_help_and_help_shows_it(kind, capsys, monkeypatch):
    parser = make_parser(kind)
    fields = [f for cls in (*RUN_ARGS[kind], CONFIGS[kind]) for f in dataclasses.fields(cls)]
    assert len(fields) > len(dataclasses.fields(TrainConfig))
    monkeypatch.setenv("COLUMNS", "100000")  # one line per flag's help: the text can be found whole
    with pytest.raises(SystemExit):
        main([kind, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in fields:
        help_text = f.metadata.get("help", "")
        assert help_text.strip(), f"{kind}: field {f.name!r} has no help text"
        actions = [a for a in parser._actions if a.dest == f.name]
        assert actions and actions[0].help == help_text, f"{kind}: field {f.name!r} is not a flag"
        assert flag(f.name) in actions[0].option_strings
        assert flag(f.name) in shown and " ".join(help_text.split()) in shown, f.name


def parse(kind, *argv):
    return _config(kind, make_parser(kind).parse_args(["--output", "/tmp/ptcore-unused", *argv]))


def test_the_flags_parse_into_the_objectives_configs():
    for kind in KINDS:  # the command line's first-run defaults, the rest as the configs'
        c = parse(kind)
        assert type(c) is CONFIGS[kind] and c.output_dir == "/tmp/ptcore-unused"
        assert {k: getattr(c, k) for k in DEFAULTS[kind]} == DEFAULTS[kind]
        assert c.progress and c.max_grad_norm == 1.0 and c.grad_accum == 1
    assert parse("grpo").max_new_tokens == 32 and GRPOConfig().max_new_tokens == 64
    assert parse("sft").packing and not parse("sft", "--no-packing").packing
    assert not parse("sft", "--no-progress").progress and parse("sft", "--resume").resume
    d = parse("dpo", "--loss-type", "ipo", "--beta", "0.3")
    assert d.loss_type == "ipo" and d.beta == 0.3 and parse("dpo").loss_type == "sigmoid"
    d = parse("dpo", "--loss-type", "sigmoid", "ipo", "--loss-weights", "1", "0.5")
    assert d.loss_type == ["sigmoid", "ipo"] and d.loss_weights == [1.0, 0.5]
    g = parse("grpo", "--epsilon", "0.3", "--stop-string", "a", "--stop-string", "bc", "--group-size", "4",
              "--rollout-correction", "token_mask", "--rollout-clip-min", "0.5")
    assert (g.epsilon_low, g.stop_strings, g.group_size) == (0.3, ["a", "bc"], 4)
    assert g.rollout_clip == (0.5, 3.0) and g.loss_options()["rollout_clip"] == (0.5, 3.0)
    assert parse("grpo", "--no-rollout-clip-max").rollout_clip == (None, None)
    assert parse("grpo", "--kl_coef", "0.1").kl_coef == 0.1  # the field's own spelling too


def test_configs_check_their_options_naming_them(tmp_path):
    for cls, kw, name in ((SFTConfig, dict(packing="no"), "run_sft: 'packing'"),
                          (DPOConfig, dict(beta=float("inf")), "run_dpo: 'beta'"),
                          (DPOConfig, dict(loss_type="nope"), "run_dpo: 'loss_type'"),
                          (GRPOConfig, dict(top_k=-1), "run_grpo: 'top_k'"),
                          (GRPOConfig, dict(max_prompt_length=0), "run_grpo: 'max_prompt_length'"),
                          (GRPOConfig, dict(reward_weights=[float("nan")]), "run_grpo: 'reward_weights'"),
                          (GRPOConfig, dict(lr=2.0), "TrainConfig: 'lr'")):
        with pytest.raises((ValueError, TypeError), match=name):
            cls(output_dir=str(tmp_path / "x"), **kw)


def test_old_keyword_options_warn_and_mean_the_same(tmp_path):
    base = config(tmp_path, "g")
    with pytest.warns(DeprecationWarning, match="run_grpo: passing group_size, rollout_clip as keyword"):
        old = objective_config(GRPOConfig, base, dict(group_size=3, rollout_clip=(0.5, 2.0)), "run_grpo")
    new = config(tmp_path, "g", GRPOConfig, group_size=3, rollout_clip_min=0.5, rollout_clip_max=2.0)
    assert old == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain TrainConfig is the objective's config at its defaults
        assert objective_config(SFTConfig, base, {}, "run_sft") == config(tmp_path, "g", SFTConfig)
    with pytest.raises(TypeError, match="unexpected keyword argument 'gruop_size'"):
        objective_config(GRPOConfig, base, dict(gruop_size=3), "run_grpo")
    with pytest.raises(TypeError, match="run_grpo: 'config' must be a GRPOConfig"):
        objective_config(GRPOConfig, config(tmp_path, "g", DPOConfig), {}, "run_grpo")


def test_run_grpo_old_keywords_give_the_same_run(tmp_path):
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(4)]
    opts = dict(group_size=2, max_new_tokens=3, temperature=0.9)
    model, tok = tiny()
    new = run_grpo(model, tok, rows, config(tmp_path, "new", GRPOConfig, max_steps=2, **opts))
    model, tok = tiny()
    with pytest.warns(DeprecationWarning, match="run_grpo: passing group_size, max_new_tokens, temperature"):
        old = run_grpo(model, tok, rows, config(tmp_path, "old", max_steps=2), **opts)
    assert len(old.metrics) == 2 and math_of(old.metrics) == math_of(new.metrics)
