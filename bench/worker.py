"""One benchmark case in a process of its own, forked from a server that has imported torch,
ptcore and transformers once (bench/harness.py), so that the case's peak memory is its own and a
case costs no interpreter start-up. The result, or the error's last line, goes back on a pipe."""
import os
import sys
import traceback

import torch

from . import harness, registry


def run(name: str, case: str, sizes: dict, dtype: str, repeats: int, device: str, conn, log_path: str) -> None:
    # what libraries print goes to the log; the suite's output stays the tables
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        bench = registry.load(name)
        torch.manual_seed(0)
        step, reset = bench.build(case, sizes, getattr(torch, dtype), device)
        result = harness.measure(step, reset, repeats, device)
        conn.send({"status": "ok", "threads": torch.get_num_threads(), **result})
    except BaseException as e:  # the suite goes on; the row says why
        traceback.print_exc()
        conn.send({"status": f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"})
    finally:
        conn.close()
