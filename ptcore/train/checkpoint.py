"""Checkpoints written atomically: everything goes into a temporary directory that is renamed
into place (``os.replace``) only once complete, so a run killed mid-save leaves the previous
checkpoint intact and never a half-written one.

Layout: ``output_dir/checkpoints/step-00000042/`` with ``model.pt``, ``optimizer.pt`` (full,
unsharded state dicts, written by rank 0), ``trainer.pt`` (scheduler, step, data position,
objective state, clocks) and ``rng-rank{r}.pt`` (each rank's Python / NumPy / torch / CUDA RNG
states, so sampling resumes exactly).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def latest(output_dir) -> Optional[Path]:
    """The complete checkpoint with the highest step (temporary directories are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "trainer.pt").is_file()]
    return max(found)[1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_dicts(model, optimizer, ctx):
    """Full (unsharded) model and optimizer state dicts on the CPU."""
    if not ctx.enabled:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(output_dir, step: int, *, model, optimizer, trainer_state: dict, ctx, keep: int = 2) -> Path:
    """Writes ``checkpoints/step-<step>`` atomically (all ranks call it); keeps the last ``keep``."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    model_sd, optim_sd = _state_dicts(model, optimizer, ctx)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    try:
        torch.save(rng_state(), tmp / f"rng-rank{ctx.rank}.pt")
        if ctx.is_main:
            torch.save(model_sd, tmp / "model.pt")
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save({**trainer_state, "world_size": ctx.world_size}, tmp / "trainer.pt")  # last
    except BaseException:  # a failed save (disk full, interrupt) leaves no half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.barrier()
    if ctx.is_main:
        if final.exists():  # a re-save of the same step (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
        for _, old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def load(path: Path, *, model, optimizer, ctx) -> dict:
    """Restores model, optimizer and this rank's RNG states; returns the trainer state."""
    trainer_state = torch.load(path / "trainer.pt", weights_only=False)
    if trainer_state.get("world_size", 1) != ctx.world_size:
        raise RuntimeError(f"{path}: saved with world size {trainer_state.get('world_size')}, resumed with "
                           f"{ctx.world_size}; the data split per rank would differ")
    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
    set_rng_state(torch.load(path / f"rng-rank{ctx.rank}.pt", weights_only=False))
    return trainer_state
