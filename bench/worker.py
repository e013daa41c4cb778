"""One benchmark case in a fresh process, so that its peak memory is its own:

    python -m bench.worker BENCH CASE SIZES_JSON DTYPE REPEATS DEVICE

prints one line ``BENCH_RESULT {json}``. Any error propagates: the runner reports its last line.
"""
import json
import sys

import torch

from bench import harness, registry


def main(argv: list[str]) -> None:
    name, case, sizes, dtype, repeats, device = argv
    bench = registry.load(name)
    torch.manual_seed(0)
    step, reset = bench.build(case, json.loads(sizes), getattr(torch, dtype), device)
    result = harness.measure(step, reset, int(repeats), device)
    print(harness.MARK + json.dumps({"status": "ok", "threads": torch.get_num_threads(), **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
