"""Scale-out: two CPU processes (gloo) with DDP and with FSDP2 take the same steps as one process
on the same global batch: same losses, same parameters."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ptcore.train import SFTConfig, run_sft
from ptcore.train.tiny import load_model_and_tokenizer
from tests.reference import assert_rule, rel_err, rule_bound
from tests.train_helpers import config, one_thread, sft_rows, tiny  # noqa: F401

STEPS = 3


def _rows():
    rows = sft_rows(16)
    rows[1]["completion"] *= 5  # ranks see different token counts: the normalizer must be global
    return rows


def _worker(rank, port, out_dir, strategies):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from datetime import timedelta
    from pathlib import Path
    # One group for all the runs (as torchrun gives), with a timeout so a bug fails, never hangs.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    for strategy in strategies:
        model, tok = tiny()
        cfg = config(Path(out_dir), strategy, SFTConfig, max_steps=STEPS, batch_size=2, grad_accum=1,
                     strategy=strategy, save_final=True, save_every=2,  # full weights gathered by rank 0
                     packing=False)
        res = run_sft(model, tok, _rows(), cfg)
        assert dist.is_initialized()  # the loop leaves a group it did not open
        # the last checkpoint (full state dicts) loads back into a fresh wrapped model
        cfg.max_steps, cfg.save_every, cfg.resume, cfg.save_final = 2, 0, True, False
        model, tok = tiny(seed=9)
        run_sft(model, tok, _rows(), cfg)
        assert len(res.metrics) == STEPS  # every rank has the metrics of the global batch
        if rank == 0:
            torch.save(res.metrics, Path(out_dir) / f"{strategy}.pt")
    dist.destroy_process_group()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    strategies = ["ddp", "fsdp"]
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), strategies), nprocs=2, join=True)
    # Tolerance rule: the float64 single process is the oracle, the fp32 single process the naive
    # baseline; each 2-rank run within the rule, and within half its bound of the single process.
    runs = {}
    for dtype in (torch.float64, torch.float32):
        single, tok = tiny(dtype=dtype)
        res = run_sft(single, tok, _rows(), config(tmp_path, f"single-{dtype}", SFTConfig, max_steps=STEPS,
                                                   batch_size=2, grad_accum=2, packing=False))
        assert next(single.parameters()).dtype == dtype
        runs[dtype] = (single, res.metrics)
    (m64, r64), (single, r32) = runs[torch.float64], runs[torch.float32]
    series = lambda r, k: torch.tensor([x[k] for x in r], dtype=torch.float64)

    def same_up_to_rounding(got, naive, ref, what):
        got, naive = got.float(), naive.float()
        assert_rule(got, ref, naive, what)
        assert rel_err(got, naive) <= rule_bound(naive, ref) / 2, what

    for strategy in strategies:
        metrics = torch.load(tmp_path / f"{strategy}.pt", weights_only=False)
        trained, _ = load_model_and_tokenizer(tmp_path / strategy / "final")
        assert next(trained.parameters()).dtype == torch.float32
        assert len(metrics) == len(r32) == len(r64) == STEPS
        for a, b, c in zip(r32, metrics, r64):
            assert a["tokens"] == b["tokens"] == c["tokens"] and a["units"] == b["units"] == c["units"]
        for k in ("loss", "grad_norm"):
            same_up_to_rounding(series(metrics, k), series(r32, k), series(r64, k), f"{strategy} {k}")
        same_up_to_rounding(_flat(trained), _flat(single), _flat(m64), f"{strategy} parameters")
