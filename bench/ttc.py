"""Test-time search on ptcore's engine against the usual ways of running it, on a tiny random Llama
(ptcore.train.tiny's config, 0.8M parameters) and a 512-token prompt:

- best-of-16 (64 new tokens each) vs Hugging Face ``generate(num_return_sequences=16)``, which
  encodes the prompt 16 times;
- step-level beam search (4 beams x 4 expansions, 8 steps of 16 tokens) and MCTS (64 simulations,
  4 expansions, steps of 16 tokens, 8 steps deep) vs the same search on an engine with prefix
  reuse turned off (``Engine(prefix_caching=False)``): every new node re-encodes its whole prefix
  from scratch, as a search loop that re-sends the full text to an engine without a prefix cache.

The implementations of a workload alternate run by run (a shared machine's load changes hit both
alike). Reported per row: median wall time, median CPU time of the process (all threads; steadier
than wall time when other jobs share the cores), tokens computed (positions run through the model), tree
tokens (distinct token prefixes whose keys/values the search needed: the limit of tokens
computed) and their ratio (target <= 1.05 for ptcore), and the speedup over the baseline (target
>= 3x over HF generate for best-of-16). The scorer is a deterministic toy (counts a token id), so
the time is the policy's. EOS is disabled so every row does the same amount of generation.

``python -m bench.ttc [--repeats R] [--only best_of_n|beam_search|mcts]`` prints the table and
writes ``bench/results/<device>/ttc.json`` and ``.png``. The suite runner (``python -m bench``)
runs the same workloads as three benchmarks (BEST_OF_N, BEAM_SEARCH and MCTS below):
there ``GFLOP/s`` is the useful model work (2 x parameters x tree tokens) per second and
``of GEMM`` the rate relative to the baseline row, i.e. ptcore's speedup.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from .registry import Benchmark, Headline

DEFAULTS = {"best_of_n": {"P": 512, "G": 64}, "beam_search": {"P": 512, "S": 16}, "mcts": {"P": 512, "S": 16}}
BASELINES = {"best_of_n": "HF generate", "beam_search": "re-encode", "mcts": "re-encode"}
N_SAMPLES, BEAMS, EXPANSIONS, STEPS, SIMULATIONS = 16, 4, 4, 8, 64
DIGIT = 7


def tiny_model(device="cpu", dtype=torch.float32, seed=0):
    from transformers import LlamaForCausalLM

    from ptcore.train.tiny import tiny_config
    cfg = tiny_config(max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prompt_tokens(P: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (P,), generator=g).tolist()


def count_digit(candidates):
    """The toy scorer: how often token DIGIT occurs, tie-broken by the last token."""
    return [c.tokens.count(DIGIT) + 0.001 * (c.tokens[-1] if c.tokens else 0) for c in candidates]


def tree_tokens(workload: str, s: dict) -> int:
    """Tokens whose keys/values the search needs when steps have their full length (no EOS, no
    stop token): best-of-N and beam search exactly; MCTS its largest possible tree."""
    P = s["P"]
    if workload == "best_of_n":
        return P + N_SAMPLES * (s["G"] - 1)
    S, N = s["S"], BEAMS * EXPANSIONS
    if workload == "beam_search":
        return P + STEPS * N * (S - 1) + (STEPS - 1) * BEAMS
    return P + SIMULATIONS * EXPANSIONS * S


def flops(workload: str, s: dict) -> int:
    return 2 * num_params(tiny_model()) * tree_tokens(workload, s)


def make_run(workload: str, impl: str, s: dict, device: str = "cpu", dtype=torch.float32):
    """(step, reset, stats): step() runs the workload once; stats() -> (tokens computed, tree
    tokens) of the last run."""
    from ptcore import ttc
    from ptcore.engine import Engine, SamplingParams, TokenTrie

    model = tiny_model(device, dtype)
    prompt = prompt_tokens(s["P"], model.config.vocab_size)
    last = {}
    if impl == "HF generate":
        ids = torch.tensor([prompt], device=device)
        G = s["G"]

        def step():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=None,
                                     top_p=None, temperature=1.0, max_new_tokens=G, min_new_tokens=G,
                                     num_return_sequences=N_SAMPLES)
            rows = out.tolist()
            trie = TokenTrie()
            for r in rows:
                trie.add(r[:-1])  # every token but the last is fed back
            last["stats"] = (N_SAMPLES * (len(rows[0]) - 1), trie.size)
            max(rows, key=lambda r: r[s["P"]:].count(DIGIT))  # the scorer's pick, as ptcore's rows do

        return step, lambda: None, lambda: last["stats"]

    engine = Engine(model, page_size=16, max_cached_tokens=1 << 16, prefix_caching=impl.startswith("ptcore"))
    if workload == "best_of_n":
        # forced length, as HF's min_new_tokens=G above: both sides generate N x G tokens
        params = SamplingParams(max_new_tokens=s["G"], min_new_tokens=s["G"], temperature=1.0, seed=0)
        run = lambda: ttc.best_of_n(engine, prompt, count_digit, n=N_SAMPLES, params=params)  # noqa: E731
    elif workload == "beam_search":
        params = SamplingParams(max_new_tokens=s["S"], temperature=1.0, seed=0)
        run = lambda: ttc.beam_search(engine, prompt, count_digit, num_beams=BEAMS, expansions=EXPANSIONS,  # noqa: E731
                                      max_steps=STEPS, step_params=params)
    elif workload == "mcts":
        params = SamplingParams(max_new_tokens=s["S"], temperature=1.0, seed=0)
        run = lambda: ttc.mcts(engine, prompt, count_digit, num_simulations=SIMULATIONS,  # noqa: E731
                               expansions=EXPANSIONS, max_steps=STEPS, step_params=params)
    else:
        raise KeyError(workload)

    def step():
        r = run()
        last["stats"] = (r.stats.tokens_computed, r.stats.tree_tokens)

    return step, engine.flush, lambda: last["stats"]  # flush: every timed run starts cold


def cases_for(workload: str) -> list[str]:
    return ["ptcore[engine]", BASELINES[workload]]


TITLES = {"best_of_n": "best-of-16 (64 new tokens each)",
          "beam_search": "beam search, 4 beams x 4 expansions, 8 steps of 16 tokens",
          "mcts": "MCTS, 64 simulations, 4 expansions, steps of 16 tokens"}
SUITE_NAMES = {"best_of_n": "ttc_best_of_n", "beam_search": "ttc_beam_search", "mcts": "ttc_mcts"}
NOTES = {"HF generate": "transformers generate(num_return_sequences=16): the prompt encoded 16 times",
         "re-encode": "the same search on Engine(prefix_caching=False): every node re-encodes its prefix"}


# The quick profile: the same 512-token prompt (what prefix sharing saves grows with it), half the
# new tokens or search steps.
QUICK = {"best_of_n": {"P": 512, "G": 32}, "beam_search": {"P": 512, "S": 8}, "mcts": {"P": 512, "S": 8}}
# ptcore's speedup over the baseline row: >= 3x over HF generate for best-of-16 (module docstring);
# the searches at least break even with re-encoding (what they save grows with the prompt)
TARGETS = {"best_of_n": 3.0, "beam_search": 1.0, "mcts": 1.0}


def benchmark(workload: str) -> Benchmark:
    """One workload's benchmark for the suite runner's table (bench/registry.py). Its unit of
    work is the useful model work, 2 x parameters x tree tokens, so the rate relative to the
    baseline row is ptcore's speedup over it (``python -m bench.ttc`` adds the token columns)."""
    sizes = dict(DEFAULTS[workload])

    def build(case, s, dtype, device):
        step, reset, _ = make_run(workload, case, s, device, dtype)
        return step, reset

    return Benchmark(
        name=SUITE_NAMES[workload], title=TITLES[workload], size_keys=tuple(sizes),
        default_sizes={"cpu": sizes, "cuda": sizes}, quick_sizes={"cpu": QUICK[workload], "cuda": sizes},
        large_sizes={**sizes, "P": 2048},
        default_dtype={"cpu": "float32", "cuda": "float32"}, baseline=BASELINES[workload],
        repeats={"cpu": 3, "cuda": 3}, quick_repeats={"cpu": 2, "cuda": 3}, unit="model FLOP", notes=NOTES,
        flops=lambda s: flops(workload, s),
        cases=lambda device, dtype: [(c, None) for c in cases_for(workload)],
        reference=lambda device, dtype: "ptcore[engine]",
        estimate_bytes=lambda case, s, dtype: 2 << 30, build=build,
        headlines=(Headline(f"speed vs {BASELINES[workload]}", "rate", BASELINES[workload],
                            (">=", TARGETS[workload])),))


BEST_OF_N, BEAM_SEARCH, MCTS = (benchmark(w) for w in DEFAULTS)


def main(argv=None) -> int:
    from . import harness
    p = argparse.ArgumentParser(prog="python -m bench.ttc", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=list(DEFAULTS))
    args = p.parse_args(argv)
    device = harness.device_type()
    torch.manual_seed(0)
    records = []
    for workload in [args.only] if args.only else list(DEFAULTS):
        s = DEFAULTS[workload]
        impls = cases_for(workload)
        runs = {impl: make_run(workload, impl, s, device) for impl in impls}
        for step, reset, _ in runs.values():
            step()  # warm-up
            reset()
        # The implementations alternate run by run, so a change in the load of a shared machine
        # hits both sides alike; CPU time (all threads of this process) is reported beside wall time.
        times = {impl: [] for impl in impls}
        cpu = {impl: [] for impl in impls}
        for _ in range(args.repeats):
            for impl in impls:
                step, reset, _ = runs[impl]
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                harness.sync(device)
                times[impl].append(time.perf_counter() - t0)
                cpu[impl].append(time.process_time() - c0)
                reset()
        rows = []
        for impl in impls:
            computed, tree = runs[impl][2]()
            rows.append({"workload": workload, "implementation": impl, "sizes": s, "times": times[impl],
                         "cpu_times": cpu[impl], "median_s": statistics.median(times[impl]),
                         "median_cpu_s": statistics.median(cpu[impl]), "tokens_computed": computed,
                         "tree_tokens": tree, "computed_over_tree": computed / tree})
            print(f"{workload} {impl}: {rows[-1]['median_s']:.3f} s", file=sys.stderr, flush=True)
        del runs
        for r in rows:
            r["speedup"] = rows[1]["median_s"] / r["median_s"]  # baseline time / this row's time
            r["cpu_speedup"] = rows[1]["median_cpu_s"] / r["median_cpu_s"]
        records += rows
    heading = (f"test-time search, tiny Llama (0.8M params), 512-token prompt | {harness.device_name(device)} | "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads | median of {args.repeats} runs")
    heads = ["workload", "implementation", "median s", "median CPU s", "tokens computed", "tree tokens",
             "computed / tree", "speedup vs baseline", "CPU-time speedup"]
    cells = [[r["workload"], r["implementation"], f"{r['median_s']:.3f}", f"{r['median_cpu_s']:.3f}",
              str(r["tokens_computed"]), str(r["tree_tokens"]), f"{r['computed_over_tree']:.3f}",
              f"{r['speedup']:.2f}", f"{r['cpu_speedup']:.2f}"] for r in records]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda c: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731
    print("\n" + heading + "\n" + line(heads) + "\n" + line(["-" * w for w in widths]))
    for c in cells:
        print(line(c))
    print("\n**" + heading + "**\n\n| " + " | ".join(heads) + " |\n|---|---|" + "---:|" * (len(heads) - 2))
    for c in cells:
        print("| " + " | ".join(c) + " |")
    out = harness.results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    stem = "ttc" if not args.only else f"ttc-{args.only}"
    (out / f"{stem}.json").write_text(json.dumps({"heading": heading, "device": harness.device_name(device),
                                                   "torch": torch.__version__, "repeats": args.repeats,
                                                   "cases": records}, indent=2) + "\n")
    _plot(out / f"{stem}.png", heading, records)
    print(f"\nwrote {out / stem}.json and .png")
    return 0


def _plot(path, heading, records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [f"{r['workload']}: {r['implementation']}" for r in records][::-1]
    colors = ["tab:orange" if "ptcore" in n else "tab:gray" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(records) + 1.8), sharey=True)
    for ax, key, label, fmt in ((axes[0], "median_s", "median wall time (s)", "{:.2f}"),
                                (axes[1], "computed_over_tree", "tokens computed / tree tokens (1.0 = limit)", "{:.2f}")):
        vals = [r[key] for r in records][::-1]
        bars = ax.barh(names, vals, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in vals], padding=3, fontsize=8)
        ax.set_xlabel(label)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    axes[1].axvline(1.0, color="k", lw=0.8, ls="--")
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
