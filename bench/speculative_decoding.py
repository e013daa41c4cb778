"""Speculative decoding on ptcore's engine vs plain decoding (greedy, batch 1, the latency regime):
wall-clock speedup, acceptance rate a, and measured tokens per target forward against the
theoretical ``(1 - a^(K+1)) / (1 - a)``.

    python -m bench.speculative_decoding [--k 4] [--tokens 96] [--repeats 3]

Models (no download): the target is a random tiny Llama (ptcore.train.tiny's config widened to
hidden 256, 8 layers, its layers 2-8's output projections scaled by 0.01 so that it behaves like a
trained model refining its first layer's guess); the draft model is the target cut to its first
layer (shared embeddings and head: a layer-skip self-draft, 1/8 of the target's layer compute). The n-gram drafter
runs on input-grounded prompts (text that repeats passages, as in summarizing or editing).
Writes ``speculative_decoding.json`` (with its scoreboard rows) and ``.png`` into the results folder
(``--out``; default bench/harness.py's ``results_dir``). ``--quick``: half the new tokens, 2 runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import harness, scoreboard
from .registry import Standalone

NAME = "speculative_decoding"


def models(seed: int = 0):
    from ptcore.train.tiny import CharTokenizer, tiny_config
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=1024)
    target = LlamaForCausalLM(cfg).eval()
    # Trained models refine their early layers' prediction in the later ones; a random model does
    # not (each layer rewrites the residual stream), so a layer-skip draft would never agree. Scale
    # the later layers' output projections down (x0.01: they still change the argmax often) to get
    # a target whose first layer predicts it often but not always (acceptance ~0.8).
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(DEEP_SCALE)
            layer.mlp.down_proj.weight.mul_(DEEP_SCALE)
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return target, draft, CharTokenizer()


DEEP_SCALE = 0.01
PASSAGE = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. ")


def prompts(tok):
    """Input-grounded prompts: passages the continuation can copy."""
    texts = [PASSAGE * 3 + "the quick brown", "a b c d e f g h a b c d e f g h a b c d"]
    return [tok.encode(t) for t in texts]


def _timed(fn, repeats):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(K: int = 4, tokens: int = 96, repeats: int = 3) -> dict:
    from ptcore.engine import Engine, SamplingParams
    from ptcore.ttc.speculative import DraftModelDrafter, NGramDrafter, speculative_generate
    target_model, draft_model, tok = models()
    target = Engine(target_model, page_size=16, max_cached_tokens=16384, prefix_caching=False)
    draft = Engine(draft_model, page_size=16, max_cached_tokens=16384, prefix_caching=False)
    sp = SamplingParams(max_new_tokens=tokens, temperature=0)
    rows = []
    for pi, prompt in enumerate(prompts(tok)):
        plain_t, plain = _timed(lambda: target.generate([prompt], sp)[0][0].tokens, repeats)
        # cost of one decode step of each model (for c = draft / target)
        rows.append({"prompt": pi, "case": "plain decoding", "median_s": plain_t, "tokens": len(plain),
                     "speedup": 1.0})
        for name, make in (("n-gram drafter", lambda: NGramDrafter(max_ngram=4)),
                           ("draft model (1 of 8 layers)", lambda: DraftModelDrafter(draft))):
            t, res = _timed(lambda: speculative_generate(target, make(), [prompt], num_draft_tokens=K, params=sp), repeats)
            st = res.stats
            a = st.acceptance_rate
            theory = (1 - a ** (K + 1)) / (1 - a) if a < 1 else K + 1.0
            theory_lens = st.expected_tokens_per_forward()
            same = res.completions[0].tokens == plain
            rows.append({"prompt": pi, "case": name, "median_s": t, "tokens": len(res.completions[0].tokens),
                         "speedup": plain_t / t, "acceptance": a, "tokens_per_forward": st.tokens_per_target_forward,
                         "theory": theory, "theory_drafted": theory_lens, "drafted_per_round": st.drafted / max(1, st.sequence_rounds),
                         "equal_to_plain": same})
    return {"K": K, "max_new_tokens": tokens, "repeats": repeats, "device": harness.device_name("cpu"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}


def table(res: dict) -> str:
    head = ["prompt", "case", "median s", "speedup", "accept a", "tok/fwd", "(1-a^(K+1))/(1-a)",
            "same, drafted L", "drafts/round", "= plain"]
    lines = [f"speculative decoding, greedy, K={res['K']}, {res['max_new_tokens']} new tokens, batch 1 | "
             f"{res['device']} | torch {res['torch']}, {res['threads']} threads | median of {res['repeats']}",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in res["rows"]:
        f = lambda k, fmt: "-" if k not in r else format(r[k], fmt)  # noqa: E731
        lines.append("| " + " | ".join([str(r["prompt"]), r["case"], f("median_s", ".3f"), f("speedup", ".2f"),
                                         f("acceptance", ".3f"), f("tokens_per_forward", ".2f"), f("theory", ".2f"),
                                         f("theory_drafted", ".2f"), f("drafted_per_round", ".2f"), str(r.get("equal_to_plain", "-"))]) + " |")
    return "\n".join(lines)


def plot(path, res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if "acceptance" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    names = [f"p{r['prompt']} {r['case']}" for r in rows]
    axes[0].barh(names, [r["speedup"] for r in rows], color="tab:orange")
    axes[0].axvline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel("wall-clock speedup over plain decoding")
    axes[1].barh(names, [r["tokens_per_forward"] for r in rows], color="tab:orange", label="measured")
    axes[1].scatter([r["theory"] for r in rows], names, color="k", zorder=3, label="(1-a^(K+1))/(1-a)")
    axes[1].scatter([r["theory_drafted"] for r in rows], names, color="tab:blue", marker="x", zorder=3,
                    label="same, over the drafted lengths")
    axes[1].set_xlabel("tokens per target forward")
    axes[1].legend(fontsize=7)
    fig.suptitle(table(res).splitlines()[0], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def headlines(res: dict) -> list[dict]:
    """Scoreboard rows, over the prompts: the draft model's speedup over plain greedy decoding
    (tokens/s), and the n-gram and draft tokens per target forward against theory's (the expected
    tokens per forward at the measured acceptance over the lengths actually drafted: an n-gram
    drafter often proposes fewer than K; at least 0.9 of it)."""
    rows = res["rows"]
    mean = lambda case, key: statistics.fmean(r[key] for r in rows if r["case"] == case)  # noqa: E731
    draft = "draft model (1 of 8 layers)"
    rate = lambda case: statistics.fmean(r["tokens"] / r["median_s"] for r in rows if r["case"] == case)  # noqa: E731
    out = [scoreboard.row(NAME, "speedup, draft model", rate(draft), "plain decoding", rate("plain decoding"),
                          unit=" tok/s", target=(">=", 1.0))]
    for case in ("n-gram drafter", draft):
        out.append(scoreboard.row(NAME, f"tokens per forward vs theory, {case}", mean(case, "tokens_per_forward"),
                                  "theory", mean(case, "theory_drafted"), target=(">=", 0.9)))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speculative_decoding", description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the quick profile: 48 new tokens, 2 runs")
    p.add_argument("--out", type=Path, help="results folder")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 48), min(args.repeats, 2)
    res = run(args.k, args.tokens, args.repeats)
    res["scoreboard"] = headlines(res)
    print(table(res))
    out = args.out or harness.results_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative_decoding.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(out / "speculative_decoding.png", res)
    print(f"wrote {out / 'speculative_decoding'}.json and .png")
    return 0 if all(r.get("equal_to_plain", True) for r in res["rows"]) else 1


BENCHMARK = Standalone(NAME, "speculative vs plain greedy decoding", main)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
