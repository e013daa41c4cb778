"""The one training loop the objectives share.

Per optimizer step: the objective hands this rank its micro-batches of the step's global batch;
their normalization units (tokens, sequences or pairs, as the objective's loss aggregates) are
summed over micro-batches and ranks first, and every micro-batch loss is divided by that global
count, so the step's gradient is that of the whole global batch however it is split (docs/losses.md
§2, the largest family of trainer bugs). Then clipping, AdamW, the warmup + cosine schedule,
one metrics line (``metrics.jsonl``), and now and then an atomic checkpoint from which a killed run
resumes the same loss curve: the data order is a pure function of (seed, position), and the
checkpoint holds the RNG states.

Guards: a step whose loss or gradient norm is not finite (summed over ranks, so every rank
agrees) makes no update; it is counted (``skipped`` in its metrics line, ``skipped_steps`` in
all) and printed, and ``config.max_consecutive_skips`` of them in a row stop the run with
:class:`TrainingError`. A model with a non-finite weight is never written (no checkpoint, no
``final/``: the last good checkpoint stays), and ``final/`` appears whole or not at all.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from ptcore.train import checkpoint
from ptcore.train.config import TrainConfig, TrainingError, TrainResult
from ptcore.train.distributed import DistContext, context, no_sync, unwrap, wrap

# Fields that measure the machine rather than the math: everything else in a metrics line is
# bitwise repeatable (seeded CPU runs, resumed or not).
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "step_time_s")


class Objective(Protocol):
    """What an objective gives the loop (see sft.py, dpo.py, grpo.py)."""
    name: str

    def prepare_model(self, model) -> None: ...  # before wrapping (ptcore.patch)
    def setup(self, model, ctx: DistContext, config: TrainConfig) -> None: ...
    def micro_batches(self, step: int, model) -> list: ...
    def units(self, mb) -> int: ...
    def tokens(self, mb) -> int: ...
    def loss(self, model, mb, global_units: float) -> tuple[torch.Tensor, dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based optimizer step): linear warmup over
    ``warmup`` steps (step 0 gets 1/warmup, not 0), then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def example_positions(step: int, config: TrainConfig, ctx: DistContext) -> list[list[int]]:
    """Stream positions of this rank's micro-batches at ``step``: the global batch of a step is the
    next ``batch_size * grad_accum * world_size`` positions of an endless stream; rank r takes the
    r-th contiguous slice, cut into ``grad_accum`` micro-batches. Same global batch, same step,
    whatever the split."""
    per_rank = config.batch_size * config.grad_accum
    start = step * per_rank * ctx.world_size + ctx.rank * per_rank
    return [list(range(start + i * config.batch_size, start + (i + 1) * config.batch_size))
            for i in range(config.grad_accum)]


class Shuffler:
    """Maps stream positions to example indices: each epoch is a fresh permutation drawn from
    (seed, epoch) only, so any position is known without replaying the run (exact resume)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("Shuffler: no examples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cache = {}

    def __call__(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if not self.shuffle:
            return i
        if epoch not in self._cache:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch][i]


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    seed %= 2**64  # torch takes seeds below 2**64
    torch.manual_seed(seed)  # all devices
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def count_parameters(model) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


def _metrics_path(config) -> Path:
    return Path(config.output_dir) / "metrics.jsonl"


def _truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """Keeps the lines of steps <= last_step (a killed run may have logged past its checkpoint)."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec["step"] <= last_step:
                    kept.append(rec)
    tmp = path.with_suffix(f".jsonl.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return kept


def _autocast(device: torch.device, bf16):
    on = device.type == "cuda" and (bf16 is None or bf16)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)


def _fused_ok(params) -> bool:
    # fused AdamW takes floating CPU / CUDA tensors, not DTensors of every placement (FSDP2 on
    # some versions); fall back to the default implementation where it refuses.
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=params[0].device,
                                                          dtype=params[0].dtype))], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return not any(type(p.data).__name__ == "DTensor" for p in params)


def make_optimizer(model, config: TrainConfig):
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused AdamW kernel (CPU and CUDA): one pass over all parameters, deterministic.
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999),
                            eps=1e-8, fused=_fused_ok(params))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup=config.warmup_steps, total=config.max_steps,
                                 min_ratio=config.min_lr_ratio))
    return opt, sched


def train(model, objective, config: TrainConfig, *, tokenizer=None) -> TrainResult:
    """Runs ``objective`` on ``model`` for ``config.max_steps`` optimizer steps (see module doc).
    Under torchrun the model is wrapped (DDP / FSDP2) here; returns the unwrapped model."""
    ctx = context()
    try:
        return _train(model, objective, config, tokenizer, ctx)
    finally:
        ctx.close()


def _train(model, objective, config, tokenizer, ctx) -> TrainResult:
    out = Path(config.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    if ctx.enabled and torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to(torch.device("cuda", ctx.local_rank))
    device = next(model.parameters()).device
    objective.prepare_model(model)  # e.g. ptcore.patch, before wrapping
    wrapped = wrap(model, ctx, config.strategy)
    optimizer, scheduler = make_optimizer(wrapped, config)
    objective.setup(wrapped, ctx, config)

    start, elapsed, flops, history = 0, 0.0, 0.0, []
    ckpt = checkpoint.latest(out) if config.resume else None
    if ckpt is not None:
        state = checkpoint.load(ckpt, model=wrapped if ctx.enabled else model, optimizer=optimizer, ctx=ctx)
        scheduler.load_state_dict(state["scheduler"])
        objective.load_state_dict(state["objective"])
        start, elapsed, flops = state["step"], state["elapsed_s"], state["flops"]
        if ctx.is_main:
            history = _truncate_metrics(_metrics_path(config), start)
            print(f"ptcore: resumed from {ckpt} at step {start}", file=sys.stderr, flush=True)
    else:
        # Seeded runs repeat bitwise: sampling (GRPO's generate) draws from the global RNGs.
        seed_everything(config.seed + 7919 * ctx.rank)
        if ctx.is_main:
            _metrics_path(config).write_text("")  # a fresh run starts a fresh curve
    ctx.barrier()

    n_params = count_parameters(wrapped)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    clip = config.max_grad_norm if config.max_grad_norm else float("inf")
    bar = tqdm(total=config.max_steps, initial=start, desc=f"ptcore {objective.name}", unit="step",
               disable=not (config.progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
    metrics_file = open(_metrics_path(config), "a") if ctx.is_main else None
    last_saved, consecutive, skipped_steps = start, 0, (state.get("skipped_steps", 0) if ckpt else 0)
    try:
        for step in range(start, config.max_steps):
            t0 = time.perf_counter()
            out_step = train_step(wrapped, objective, optimizer, scheduler, step, ctx, config, params, clip, device)
            global_tokens, global_units, grad_norm, lr, reduced, keys, skipped = out_step
            flops += 6.0 * n_params * global_tokens + reduced[1]
            dt = time.perf_counter() - t0
            elapsed += dt
            rec = {"step": step + 1, "loss": reduced[0], "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": int(global_tokens), "units": int(global_units),
                   "tokens_per_s": global_tokens / dt if dt > 0 else 0.0, "step_time_s": dt,
                   "elapsed_s": elapsed, "flops": flops}
            rec.update({k: v for k, v in zip(keys, reduced[2:])})
            consecutive = consecutive + 1 if skipped else 0
            skipped_steps += int(skipped)
            rec["skipped"], rec["skipped_steps"] = int(skipped), skipped_steps
            history.append(rec)
            if metrics_file is not None:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main and not config.progress and (step + 1) % config.log_every == 0:
                print(_summary(rec), file=sys.stderr, flush=True)
            if skipped:
                if ctx.is_main:
                    print(f"ptcore {objective.name}: step {step + 1} skipped (no update): loss "
                          f"{rec['loss']:.4g}, grad norm {grad_norm:.4g}; {consecutive} in a row "
                          f"(the run stops at {config.max_consecutive_skips})", file=sys.stderr, flush=True)
                if consecutive >= config.max_consecutive_skips:
                    good = checkpoint.latest(out)
                    raise TrainingError(
                        f"ptcore {objective.name}: {consecutive} consecutive steps (up to step {step + 1}) "
                        "had a non-finite loss or gradient norm; stopping (the model diverged or the data "
                        "holds something the model cannot score: lower the learning rate, check the "
                        "data). Nothing was saved after the last good checkpoint"
                        + (f" ({good})" if good is not None else " (there is none)") + ".")
            if config.save_every and (step + 1) % config.save_every == 0:
                _save(out, step + 1, wrapped if ctx.enabled else model, optimizer, scheduler,
                      objective, elapsed, flops, ctx, config, skipped_steps=skipped_steps)
                last_saved = step + 1
        if config.save_every and last_saved != config.max_steps and start < config.max_steps:
            _save(out, config.max_steps, wrapped if ctx.enabled else model, optimizer, scheduler,
                  objective, elapsed, flops, ctx, config, skipped_steps=skipped_steps)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    final_dir = None
    if config.save_final:
        _check_finite(wrapped, ctx, f"final/ at step {config.max_steps}", out)
        final_dir = save_final(wrapped, tokenizer, out / "final", ctx)
    return TrainResult(metrics=history, step=config.max_steps, final_dir=final_dir, model=unwrap(wrapped))


def train_step(wrapped, objective, optimizer, scheduler, step, ctx, config, params, clip, device):
    """One optimizer step (see the module docstring). Returns (global tokens, global units, grad
    norm before clipping, lr used, [loss, extra FLOPs, *metric values] summed over ranks, metric
    names)."""
    wrapped.train()
    mbs = objective.micro_batches(step, wrapped)
    local = torch.tensor([float(sum(objective.units(mb) for mb in mbs)),
                          float(sum(objective.tokens(mb) for mb in mbs))], dtype=torch.float64)
    global_units, global_tokens = ctx.all_reduce_sum(local).tolist()
    sums, loss_sum = {}, 0.0
    for i, mb in enumerate(mbs):
        with no_sync(wrapped, i < len(mbs) - 1), _autocast(device, config.bf16):
            loss, mb_metrics = objective.loss(wrapped, mb, global_units)
            # DDP / FSDP2 average gradients over ranks; the loss is already a share of the global
            # batch, so undo the average.
            (loss * ctx.world_size).backward()
        loss_sum += float(loss.detach())
        weight = objective.units(mb) / max(global_units, 1.0)
        for k, v in mb_metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * weight
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))  # global under DDP / FSDP2
    keys = sorted(sums)
    extra = objective.step_flops() if hasattr(objective, "step_flops") else 0.0
    reduced = ctx.all_reduce_sum(torch.tensor([loss_sum, extra] + [sums[k] for k in keys],
                                              dtype=torch.float64)).tolist()
    # The same decision on every rank: the reduced loss and the global norm are the same there.
    skipped = not (math.isfinite(reduced[0]) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    lr = scheduler.get_last_lr()[0]
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # a skipped step still advances the schedule: lr stays a function of the step
    optimizer.zero_grad(set_to_none=True)
    return global_tokens, global_units, grad_norm, lr, reduced, keys, skipped


def _summary(rec: dict) -> str:
    show = {k: v for k, v in rec.items() if k not in TIMING_KEYS and k not in ("flops", "units")}
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in show.items())


def _check_finite(model, ctx, what: str, out) -> None:
    """Raises TrainingError when a weight of ``model`` is not finite (on any rank): such a model
    is never written."""
    bad = 0.0
    with torch.no_grad():
        for p in model.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard
            if t.numel() and not bool(torch.isfinite(t).all()):
                bad = 1.0
                break
    if ctx.all_reduce_sum(torch.tensor([bad], dtype=torch.float64)).item() > 0:
        good = checkpoint.latest(out)
        raise TrainingError(f"ptcore: the model has non-finite weights; not saving {what} (the last "
                            "good checkpoint stays: " + (str(good) if good is not None else "none") + ")")


def _save(out, step, model, optimizer, scheduler, objective, elapsed, flops, ctx, config, *,
          skipped_steps: int = 0):
    _check_finite(model, ctx, f"the checkpoint of step {step}", out)
    state = {"step": step, "scheduler": scheduler.state_dict(), "objective": objective.state_dict(),
             "elapsed_s": elapsed, "flops": flops, "config": config.to_dict(),
             "skipped_steps": skipped_steps}
    checkpoint.save(out, step, model=model, optimizer=optimizer, trainer_state=state, ctx=ctx,
                    keep=config.keep_checkpoints)


def save_final(model, tokenizer, path: Path, ctx) -> str:
    """The trained model (full weights, HF ``save_pretrained``) and its tokenizer, by rank 0."""
    if ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = None
    if ctx.is_main:
        # Written whole into a temporary directory, then renamed into place: a failed save never
        # leaves half a model in final/ (nor a stray temporary directory).
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            base = unwrap(model)
            base.save_pretrained(tmp, state_dict=sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return str(path)
