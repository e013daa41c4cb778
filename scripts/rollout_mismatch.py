"""One-off measurement: sampler (ptcore.engine) vs trainer log-probs of a GRPO rollout, fp32 CPU.

    python scripts/rollout_mismatch.py --model tiny
    python scripts/rollout_mismatch.py --model smollm2-135m-instruct --prompts 4 --group-size 4

For each setting it prints max and mean |sampling_logp - trainer_logp| over the completion tokens
and splits the difference into its sources, on the same tokens:
  engine  vs HF forward (float32 logits, log-softmax in float64): the engine's own forward (paged
          attention, packed rows) against the HF backbone the trainer runs;
  trainer vs HF forward: the fused LM-head log-prob (linear_logprobs, deterministic or not)
          against the log-softmax of the HF logits, on the same hidden states.
"""
import argparse
import json
import tempfile

import torch

from ptcore.ops import linear_logprobs
from ptcore.train.config import GRPOConfig
from ptcore.train.data import load_records, prompt_examples
from ptcore.train.grpo import GRPOObjective


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ptcore.train.tiny import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(args.model, dtype=torch.float32)
    if args.model == "tiny":
        data = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (500, 61), (7, 7), (12, 30), (99, 1)]]
    else:
        data = [{"prompt": tok.apply_chat_template([{"role": "user", "content": f"What is {a}+{b}? Answer with the number."}],
                                                   tokenize=False, add_generation_prompt=True), "answer": str(a + b)}
                for a, b in [(123, 456), (30, 4), (500, 61), (7, 7), (12, 30), (99, 1)]]
    data = data[:args.prompts]
    prompts = prompt_examples(load_records(data, "grpo"), tok, 256, report=False)
    report = {}
    for det in (True, False):
        cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), batch_size=len(prompts), max_length=512, seed=0,
                         group_size=args.group_size, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, deterministic=det)
        obj = GRPOObjective(prompts, tok, cfg, reward_fns=[lambda prompts, completions, **_: [0.0] * len(completions)])
        obj.prepare_model(model)
        obj.setup(model, obj.ctx, cfg)
        b = obj.make_rollout(model, prompts)
        _, metrics = obj.loss(model, b, obj.units(b))
        m = b["mask"].bool()
        samp, trainer = b["sampling_logps"].double(), b["old_logps"].double()
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b["position_ids"], output_hidden_states=True)
            z = out.logits.float().double() / args.temperature
            hf = torch.log_softmax(z, -1).gather(-1, b["target"].clamp(min=0)[..., None])[..., 0]
            hidden = out.hidden_states[-1]
            head = linear_logprobs(hidden, model.get_output_embeddings().weight, b["target"],
                                   temperature=args.temperature, deterministic=det).double()
        d = lambda x, y: ((x - y)[m].abs().max().item(), (x - y)[m].abs().mean().item())
        report["deterministic" if det else "default"] = {
            "tokens": int(m.sum()),
            "sampler_vs_trainer_max_mean": d(samp, trainer),
            "engine_vs_hf_forward_max_mean": d(samp, hf),
            "trainer_vs_hf_forward_max_mean": d(trainer, hf),
            "trainer_head_on_hf_hidden_vs_trainer": d(head, trainer),
            "metrics": {k: v for k, v in metrics.items() if k.startswith("rollout/")}}
    print(json.dumps({"model": args.model, **report}, indent=1))


if __name__ == "__main__":
    main()
