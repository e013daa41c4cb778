"""``ptcore sft|dpo|grpo`` end to end at tiny sizes (in-process), chained through saved models."""
import json

import pytest

from ptcore.__main__ import main
from ptcore.train.tasks import write_jsonl
from tests.train_helpers import one_thread  # noqa: F401

TINY = ["--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--no-progress", "--num-examples", "16"]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_sft_then_dpo_then_grpo(tmp_path, capsys):
    sft = tmp_path / "sft"
    assert main(["sft", "--task", "addition", "--output", str(sft), *TINY]) == 0
    assert [m["step"] for m in lines(sft / "metrics.jsonl")] == [1, 2]
    assert (sft / "final" / "config.json").is_file()

    data = write_jsonl("addition", "dpo", tmp_path / "pairs.jsonl", n=8)
    dpo = tmp_path / "dpo"
    assert main(["dpo", "--model", str(sft / "final"), "--data", str(data), "--output", str(dpo),
                 "--loss-type", "ipo", *TINY]) == 0
    assert "loss/ipo" in lines(dpo / "metrics.jsonl")[0]

    grpo = tmp_path / "grpo"
    assert main(["grpo", "--model", str(dpo / "final"), "--task", "countdown", "--output", str(grpo),
                 "--group-size", "2", "--max-new-tokens", "4", "--save-every", "1", *TINY]) == 0
    m = lines(grpo / "metrics.jsonl")
    assert len(m) == 2 and "rewards/answer_reward" in m[0]
    assert (grpo / "checkpoints" / "step-00000002" / "trainer.pt").is_file()
    err = capsys.readouterr().err
    assert "final loss" in err and "wrote 16 countdown examples" in err


def test_cli_errors(tmp_path, capsys):
    """Usage and data errors: one line on stderr naming the flag (or file:line), exit status 2."""
    assert main(["sft", "--output", str(tmp_path / "x")]) == 2
    assert "--data FILE.jsonl, or --task" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(["sft", "--data", str(bad), "--output", str(tmp_path / "y")]) == 2
    assert f"{bad}:2: missing key 'completion'" in capsys.readouterr().err
    assert main(["dpo", "--task", "addition", "--output", str(tmp_path / "z"), "--batch-size", "0"]) == 2
    assert "--batch-size must be an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "--group-size" in capsys.readouterr().out
