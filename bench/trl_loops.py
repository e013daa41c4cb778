"""The post-training loops against TRL: one optimizer step of SFT, DPO and GRPO with ptcore
(ptcore.train) and with TRL's SFTTrainer, DPOTrainer and GRPOTrainer, on the same model (the
embedded tiny Llama, float32 on the CPU), the same data and the same batch sizes.

Each objective is its own registered benchmark (``loop_sft``, ``loop_dpo``, ``loop_grpo``: SFT,
DPO and GRPO below), with three rows:

* ``model GEMMs``: the GEMMs of the model's linear layers (forward and both backward GEMMs) for the
  step's tokens, into preallocated outputs: the unavoidable work, so "of GEMM" is the throughput
  per FLOP (6 x parameters x tokens over the measured GEMM rate);
* ``ptcore``: one step of ptcore's loop (``ptcore.train.loop.train_step``: micro-batch collation,
  fused loss through ``ptcore.patch``, clipping, AdamW, schedule), with its defaults (SFT: the
  examples packed into rows of P + C tokens, no padding);
* ``TRL <Trainer>``: one step of the trainer as its ``train()`` does it (``training_step`` on the
  next batch of its dataloader, clipping, optimizer and scheduler steps), with its defaults
  (SFT and DPO: no packing, logits materialized; DPO: the reference forward every step, as
  ``precompute_ref_log_probs=False``; GRPO: HF ``generate``, ``steps_per_generation=1``).

Every step does the same work, so tokens/s = GFLOP/s * 1e9 / (6 x parameters), counting real
(non-padding) tokens: SFT rows have lengths from 1/4 to all of P + C tokens (as real data does;
there are B of them and every step takes all B, TRL padding them to the longest, ptcore packing
them); DPO and GRPO examples have fixed lengths (GRPO completions forced to ``C`` tokens with
``min_new_tokens``), so no padding anywhere. The time ratio column is TRL's time over ptcore's: ptcore's
speedup (target >= 1.5x, with no more peak memory).

``python -m bench.trl_loops [sft dpo grpo] --threads 1`` alternates ptcore and TRL steps in one
process instead (medians of 14 each): steadier than the suite on a machine whose load drifts.
"""
from __future__ import annotations

import copy
import importlib.util
import random
import tempfile

import torch

from .registry import Benchmark, Headline

OBJECTIVES = ("sft", "dpo", "grpo")
TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}
BASELINE = "model GEMMs"
LR = 1e-5


def tiny_model(dtype, device):
    from ptcore.train.tiny import load_model_and_tokenizer
    model, _ = load_model_and_tokenizer("tiny", dtype=dtype, seed=0)
    return model.to(device)


def n_params() -> int:
    from ptcore.train.tiny import tiny_config
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(tiny_config()).parameters())


def hf_tokenizer():
    """The tiny model's tokenizer, a Hugging Face fast tokenizer (TRL needs one)."""
    from ptcore.train.tiny import CharTokenizer
    return CharTokenizer()


def records(kind: str, s: dict) -> list[dict]:
    """Fixed-length synthetic rows: prompt P-1 characters (+ bos), completions C-1 (+ eos); 32
    batches' worth for DPO and GRPO (more than a run takes: DPO's reference log-probs are computed
    for all of them before the first step)."""
    rng = random.Random(0)
    n = 32 * s["B"]
    text = lambda k: "".join(rng.choice("0123456789+-*=abcdefghij ") for _ in range(k))
    P, C = s["P"], s["C"]
    if kind == "sft":
        # Real SFT data varies in length: B rows (every step takes all of them, so every step
        # does the same work) of 1/4 to all of P + C tokens.
        lens = [(rng.randint(P // 4, P), rng.randint(C // 4, C)) for _ in range(s["B"])]
        return [{"prompt": text(p - 1), "completion": text(c - 1)} for p, c in lens]
    if kind == "dpo":
        return [{"prompt": text(P - 1), "chosen": text(C - 1), "rejected": text(C - 1)} for _ in range(n)]
    return [{"prompt": text(P - 1), "answer": "7"} for _ in range(n)]


def reward_len(prompts=None, completions=None, **_):
    """A cheap toy reward (how many 7s): the benchmark times the loop, not a verifier."""
    return [float(c.count("7")) for c in completions]


def tokens_per_step(kind: str, s: dict) -> int:
    """Real (non-padding) tokens of one step: the FLOPs' 6 x params x tokens counts these."""
    if kind == "sft":
        return sum(len(r["prompt"]) + len(r["completion"]) + 2 for r in records("sft", s))
    per = s["P"] + s["C"]
    if kind == "grpo":
        return s["B"] * s["G"] * per
    return (2 if kind == "dpo" else 1) * s["B"] * per


# ---- the three rows ----

def model_gemms(kind, s, dtype, device):
    """Forward + both backward GEMMs of every linear layer for the step's tokens."""
    model = tiny_model(dtype, device)
    N = tokens_per_step(kind, s)
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    bufs = []
    for w in ws:
        out_f, in_f = w.shape
        x = torch.randn(N, in_f, dtype=dtype, device=device)
        g = torch.randn(N, out_f, dtype=dtype, device=device)
        bufs.append((x, w, g, torch.empty(N, out_f, dtype=dtype, device=device),
                     torch.empty(N, in_f, dtype=dtype, device=device), torch.empty_like(w)))

    def step():
        for x, w, g, y, gx, gw in bufs:
            torch.mm(x, w.t(), out=y)
            torch.mm(g, w, out=gx)
            torch.mm(g.t(), x, out=gw)

    step.held_bytes = sum(y.nbytes + gx.nbytes + gw.nbytes for _, _, _, y, gx, gw in bufs)
    return step, lambda: None


def ptcore_step(kind, s, dtype, device):
    from ptcore.train.config import DPOConfig, GRPOConfig, SFTConfig
    from ptcore.train.data import load_records, pair_examples, prompt_examples, sft_examples
    from ptcore.train.distributed import DistContext
    from ptcore.train.loop import make_optimizer, train_step

    model, tok = tiny_model(dtype, device), hf_tokenizer()
    common = dict(output_dir=tempfile.mkdtemp(prefix="ptcore-bench-"), max_steps=10**6, batch_size=s["B"],
                  max_length=s["P"] + s["C"], lr=LR, progress=False, save_final=False)
    recs = load_records(records(kind, s), kind)
    if kind == "sft":
        from ptcore.train.sft import SFTObjective
        cfg = SFTConfig(**common, packing=True)
        obj = SFTObjective(sft_examples(recs, tok, cfg.max_length), tok, cfg)
        cfg.batch_size = s["B"]  # examples per micro-batch (as TRL's), packed into rows: all B per step
    elif kind == "dpo":
        from ptcore.train.dpo import DPOObjective
        cfg = DPOConfig(**common, beta=0.1)
        obj = DPOObjective(pair_examples(recs, tok, cfg.max_length), tok, cfg)
    else:
        from ptcore.train.grpo import GRPOObjective
        model.generation_config.min_new_tokens = s["C"]
        cfg = GRPOConfig(**common, group_size=s["G"], max_new_tokens=s["C"], loss_type="dapo")
        obj = GRPOObjective(prompt_examples(recs, tok, s["P"]), tok, cfg, reward_fns=[reward_len])
    ctx = DistContext()
    obj.prepare_model(model)
    optimizer, scheduler = make_optimizer(model, cfg)
    obj.setup(model, ctx, cfg)  # DPO: the reference log-probs, once, before the first step
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"step": 0}

    def step():
        train_step(model, obj, optimizer, scheduler, state["step"], ctx, cfg, params, 1.0, torch.device(device))
        state["step"] += 1

    return step, lambda: None


def trl_step(kind, s, dtype, device):
    from datasets import Dataset

    model, tok = tiny_model(dtype, device), hf_tokenizer()
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), learning_rate=LR, report_to=[],
                  logging_steps=10**9, save_strategy="no", use_cpu=device == "cpu", bf16=dtype == torch.bfloat16,
                  disable_tqdm=True, dataloader_num_workers=0, max_steps=10**6, max_grad_norm=1.0, seed=0)
    ds = Dataset.from_list(records(kind, s))
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        args = SFTConfig(per_device_train_batch_size=s["B"], max_length=s["P"] + s["C"], packing=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    elif kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        args = DPOConfig(per_device_train_batch_size=s["B"], max_length=s["P"] + s["C"], beta=0.1, **common)
        ref = copy.deepcopy(model).eval()  # what TRL makes itself when it can reload the model by name
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    else:
        from trl import GRPOConfig, GRPOTrainer
        args = GRPOConfig(per_device_train_batch_size=s["B"] * s["G"], num_generations=s["G"],
                          max_completion_length=s["C"], steps_per_generation=1, num_iterations=1, beta=0.0,
                          loss_type="dapo", temperature=1.0, top_k=0, top_p=1.0,
                          generation_kwargs={"min_new_tokens": s["C"]}, log_completions=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward_len], args=args, train_dataset=ds,
                              processing_class=tok)
    return trainer_step(trainer, args), lambda: None


def trainer_step(trainer, args):
    """One optimizer step of a TRL trainer as ``train()`` takes it (next batch, the training step
    with the batch's label-token count, clipping, optimizer, scheduler), without ``train()``'s
    logging and callbacks: the TRL step both loop benchmarks time (here and bench/loop_real.py)."""
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    loader = trainer.get_train_dataloader()
    state = {"it": iter(loader)}
    trainer.model.train()

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    trainer.current_gradient_accumulation_steps = 1  # what train() sets

    def step():
        batch = next_batch()
        labels = batch.get("labels") if isinstance(batch, dict) else None
        # train() passes the batch's label-token count (the loss is their sum over it)
        items = (labels[:, 1:] != -100).sum() if labels is not None else None
        trainer.training_step(trainer.model, batch, items)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)

    return step


def benchmark(kind: str) -> Benchmark:
    """One objective's benchmark (bench/registry.py)."""
    trainer = f"TRL {TRAINERS[kind]}"
    keys = ("B", "P", "C", "G") if kind == "grpo" else ("B", "P", "C")
    sizes = {"sft": dict(B=32, P=96, C=32), "dpo": dict(B=8, P=96, C=32), "grpo": dict(B=4, P=48, C=16, G=8)}[kind]
    # the quick profile: a quarter of the batch (GRPO: half the prompts), the same lengths
    quick = {k: max(1, v // (2 if kind == "grpo" else 4)) if k == "B" else v for k, v in sizes.items()}
    large = {k: v * 2 if k in ("B",) else v for k, v in sizes.items()}
    what = {"sft": "prompt+completion rows of varied lengths", "dpo": "preference pairs",
            "grpo": f"prompts x {sizes.get('G')} completions (generation included)"}[kind]

    def cases(device, dtype):
        why = None if importlib.util.find_spec("trl") else "trl not installed"
        return [(BASELINE, None), ("ptcore", None), (trainer, why)]

    def build(case, s, dtype, device):
        if case == BASELINE:
            return model_gemms(kind, s, dtype, device)
        if case == "ptcore":
            return ptcore_step(kind, s, dtype, device)
        return trl_step(kind, s, dtype, device)

    return Benchmark(
        name=f"loop_{kind}",
        title=f"{kind.upper()} optimizer step, tiny Llama ({n_params() / 1e6:.2f}M params), {what}",
        size_keys=keys, default_sizes={"cpu": sizes, "cuda": {k: v * (4 if k == "B" else 1) for k, v in sizes.items()}},
        quick_sizes={"cpu": quick, "cuda": sizes}, large_sizes=large,
        default_dtype={"cpu": "float32", "cuda": "bfloat16"}, baseline=BASELINE,
        repeats={"cpu": 10, "cuda": 20}, quick_repeats={"cpu": 3, "cuda": 10},
        flops=lambda s: 6.0 * n_params() * tokens_per_step(kind, s),
        cases=cases, reference=lambda device, dtype: "ptcore",
        estimate_bytes=lambda case, s, dtype: 2 * 10**9, build=build,
        headlines=(Headline(f"speed vs {trainer}", "rate", trainer, (">=", 1.5)),
                   Headline(f"memory vs {trainer}", "extra_peak_mb", trainer, ("<=", 1.0))),
        notes={BASELINE: "the linear layers' 3 GEMMs for the step's tokens: throughput per FLOP = of GEMM",
               trainer: {"sft": "padded to the longest row, logits materialized", "dpo": "reference forward every step",
                         "grpo": "HF generate, logits materialized"}[kind]},
    )


SFT, DPO, GRPO = (benchmark(kind) for kind in OBJECTIVES)


def alternating(kinds, reps: int = 14) -> list[dict]:
    """ptcore and TRL steps alternated in one process (median of ``reps`` each): steadier than
    the suite's one-case-after-another on a machine whose load drifts."""
    import statistics
    import time
    rows = []
    for kind in kinds:
        b = benchmark(kind)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        s = b.default_sizes[device]
        dtype = getattr(torch, b.default_dtype[device])
        trainer = f"TRL {TRAINERS[kind]}"
        steps = {c: b.build(c, s, dtype, device)[0] for c in ("ptcore", trainer)}
        times = {c: [] for c in steps}
        for st in steps.values():
            st()  # warm-up
        for _ in range(reps):
            for c, st in steps.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                st()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[c].append(time.perf_counter() - t)
        toks = tokens_per_step(kind, s)
        med = {c: statistics.median(v) for c, v in times.items()}
        rows.append({"objective": kind, "tokens_per_step": toks, "ptcore_tokens_per_s": toks / med["ptcore"],
                     "trl_tokens_per_s": toks / med[trainer], "speedup": med[trainer] / med["ptcore"]})
        r = rows[-1]
        print(f"{kind}: {toks} tokens/step; ptcore {r['ptcore_tokens_per_s']:.0f} tok/s, {trainer} "
              f"{r['trl_tokens_per_s']:.0f} tok/s: ptcore {r['speedup']:.2f}x", flush=True)
    return rows


if __name__ == "__main__":  # python -m bench.trl_loops [sft dpo grpo] [--reps N] [--threads T]
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.trl_loops", description=alternating.__doc__)
    p.add_argument("objectives", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--reps", type=int, default=14)
    p.add_argument("--threads", type=int, help="torch threads (1 is steadiest on a shared machine)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    alternating(a.objectives or list(OBJECTIVES), a.reps)
