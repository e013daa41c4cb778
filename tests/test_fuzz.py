"""Issue 18's fuzz suite: hypothesis draws the arguments of every public op at tiny sizes -- good
values, and now and then one bad one (a NaN, an inf, a wrong dtype or shape, a bool where a number
belongs, a list where a tensor belongs, a value out of range) -- and runs each case in a worker
process (tests/fuzz_worker.py) under faulthandler with a timeout, so a crash or a hang fails the
test and prints the case. Every outcome must be one of:

* a result that matches the float64 reference (the same op on float64 copies of the inputs, on
  the ``torch`` backend where the op has backends): non-finite exactly where the reference is,
  elsewhere within the tolerance rule (tests/reference.py): a relative error at most twice that of
  the naive computation -- the same op on the case's own inputs, in their dtype, on the ``torch``
  backend where it has backends (plain PyTorch) -- plus the dtype's slack;
* a ValueError / TypeError whose message names one of the op's arguments (or the environment
  variable); where the float64 reference raises, the op must raise too.

Default: about 25 cases per op (a minute or so on 2 cores); ``pytest --fuzz-scale 10`` runs ten
times as many.
"""
from __future__ import annotations

import inspect
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ptcore  # noqa: E402
from tests.fuzz_worker import resolve  # noqa: E402
from tests.reference import SLACK, rel_err, rule_bound  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASE_TIMEOUT_S = 60.0  # generous: a first call compiles nothing, but the machine is shared
BASE_EXAMPLES = 25
NAN, INF = float("nan"), float("inf")
ACCEPTED = ("ValueError", "TypeError", "DataError")
STATS = {}


class Worker:
    """One long-lived worker process; restarted after a crash or a hang."""

    def __init__(self):
        self.proc = None
        self.err = None

    def start(self):
        self.err = tempfile.TemporaryFile()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz_worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)

    def stderr_tail(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case, timeout=CASE_TIMEOUT_S):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        data = pickle.dumps(case)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return ("hang", f"no answer in {timeout:.0f} s")
        head = self.proc.stdout.read(8)
        if len(head) < 8:
            self.proc.wait()
            code, tail = self.proc.returncode, self.stderr_tail()
            self.proc = None
            return ("crash", f"the worker died (exit status {code}):\n{tail}")
        (n,) = struct.unpack("<Q", head)
        return pickle.loads(self.proc.stdout.read(n))


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if STATS:
        print("\nfuzz outcomes: " + "; ".join(f"{op}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                                               for op, c in sorted(STATS.items())))


# ---- drawing values ----

def _gen(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def maybe_nan(data, g, t, values=(NAN, INF, -INF)):
    """One NaN (or inf) in a float tensor, sometimes: a valid input whose answer holds NaN.
    LM-head ops get NaN only: an inf hidden state makes a row of logits hold both -inf and +inf,
    whose log-softmax the torch reference gives as -inf (later clamped to a finite ratio by the
    policy loss) and the fused kernels as NaN; neither is a number to compare."""
    if t.numel() and t.is_floating_point() and data.draw(st.integers(0, 9), label="poison") == 0:
        t = t.clone()
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = data.draw(
            st.sampled_from(list(values)), label="poison value")
    return t


BAD_NUMBERS = [NAN, INF, -INF, -1.0, 0.0, 1e300, -1e-300, True, "1", None, [1.0], 2**64]


def mutate(data, kw: dict, bad: dict):
    """With probability about 1/2, replace one argument by a bad value: ``bad`` maps an argument
    name to candidate values (callables get the current kwargs)."""
    if not bad or data.draw(st.booleans(), label="mutate"):
        return kw, None
    name = data.draw(st.sampled_from(sorted(bad)), label="bad argument")
    value = data.draw(st.sampled_from(bad[name]), label=f"bad {name}")
    kw = dict(kw)
    try:
        kw[name] = value(kw) if callable(value) else value
    except (IndexError, RuntimeError):  # this bad value does not apply at these sizes
        hypothesis.assume(False)
    return kw, name


# ---- the ops: each returns (target, kwargs, positional names, backend, returned, env) ----

def _dtype(data, allow=(torch.float32, torch.float64, torch.bfloat16)):
    return data.draw(st.sampled_from(allow), label="dtype")


def _backend(data):
    return data.draw(st.sampled_from(["cpu", "torch"]), label="backend")


def op_linear_cross_entropy(data):
    g, dt = _gen(data), _dtype(data)
    N, H, V = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("N", 0, 5), ("H", 1, 6), ("V", 1, 7)))
    t = torch.randint(0, V, (N,), generator=g)
    if N:
        t[0] = -100
    kw = dict(input=maybe_nan(data, g, randn(g, N, H, dtype=dt), (NAN,)), weight=randn(g, V, H, dtype=dt), target=t,
              bias=data.draw(st.sampled_from([None, "b"])), ignore_index=-100,
              label_smoothing=data.draw(st.sampled_from([0.0, 0.1, 0.5])),
              z_loss=data.draw(st.sampled_from([0.0, 1e-3])),
              softcap=data.draw(st.sampled_from([None, 2.0, 30.0])),
              reduction=data.draw(st.sampled_from(["mean", "sum", "none"])))
    kw["bias"] = None if kw["bias"] is None else randn(g, V, dtype=dt)
    bad = {"target": [lambda k: k["target"] + V, lambda k: k["target"].int(), lambda k: k["target"].float(),
                      lambda k: k["target"].bool(), lambda k: k["target"].tolist()],
           "weight": [lambda k: k["weight"][:, :-1], lambda k: k["weight"].double() if dt != torch.float64 else k["weight"].float(),
                      lambda k: k["weight"].tolist(), lambda k: k["weight"][0]],
           "input": [lambda k: k["input"].long(), lambda k: k["input"].tolist(), lambda k: k["input"][..., :0]],
           "bias": [lambda k: randn(g, V + 1, dtype=dt), lambda k: randn(g, V, 1, dtype=dt)],
           "ignore_index": [1.5, True, 2**63, -2**63 - 1, "x"],
           "label_smoothing": [1.5, -0.1, NAN, INF, True], "z_loss": [-1.0, NAN, INF, "0"],
           "softcap": [0.0, -1.0, NAN, INF, 1e300, True], "reduction": ["avg", None, 1]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.linear_cross_entropy", kw, ["input", "weight", "target"], _backend(data)


def op_linear_logprobs(data):
    g, dt = _gen(data), _dtype(data)
    N, H, V = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("N", 0, 5), ("H", 1, 6), ("V", 1, 7)))
    t = torch.randint(0, V, (N,), generator=g)
    kw = dict(input=maybe_nan(data, g, randn(g, N, H, dtype=dt), (NAN,)), weight=randn(g, V, H, dtype=dt), target=t,
              temperature=data.draw(st.sampled_from([0.5, 1.0, 2.0])),
              softcap=data.draw(st.sampled_from([None, 5.0])),
              return_entropy=data.draw(st.booleans()), deterministic=data.draw(st.booleans()))
    bad = {"temperature": [0.0, -1.0, NAN, INF, True, None], "return_entropy": ["no", 1, None],
           "deterministic": ["yes", 0], "target": [lambda k: k["target"].bool(), lambda k: k["target"] - V - 1],
           "ignore_index": [2**63, 0.5], "softcap": [0.0, NAN, -INF]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.linear_logprobs", kw, ["input", "weight", "target"], _backend(data)


def op_dpo_loss(data):
    from ptcore.ops.preference import LOSS_TYPES
    g = _gen(data)
    B = data.draw(st.integers(0, 4), label="B")
    dt = _dtype(data, (torch.float32, torch.float64))
    neg = lambda: -randn(g, B, dtype=dt, scale=3.0).abs()
    kw = dict(policy_chosen_logps=maybe_nan(data, g, neg()), policy_rejected_logps=neg(),
              ref_chosen_logps=neg(), ref_rejected_logps=neg(),
              beta=data.draw(st.sampled_from([0.05, 0.1, 1.0])),
              loss_type=data.draw(st.sampled_from(LOSS_TYPES)),
              label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
              chosen_lengths=torch.randint(1, 5, (B,), generator=g),
              rejected_lengths=torch.randint(1, 5, (B,), generator=g))
    bad = {"beta": [-1.0, NAN, INF, 1e300, True], "loss_type": ["nope", ["sigmoid", "nope"], None],
           "label_smoothing": [1.0, 0.7, NAN, -0.1], "chosen_lengths": [lambda k: k["chosen_lengths"] * 0,
                                                                      lambda k: k["chosen_lengths"].float() + 0.5,
                                                                      lambda k: k["chosen_lengths"].bool()],
           "policy_chosen_logps": [lambda k: k["policy_chosen_logps"][:0] if B else torch.zeros(1),
                                   lambda k: k["policy_chosen_logps"].abs() + 0.5, lambda k: k["policy_chosen_logps"].tolist()],
           "ref_chosen_logps": [None], "gamma": [NAN, "x"], "loss_weights": [[1.0, 2.0], [NAN]]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.dpo_loss", kw, [], None


def op_policy_loss(data):
    from ptcore.ops.policy import LOSS_TYPES
    g = _gen(data)
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 4), label="T")
    logps = -randn(g, B, T, scale=2.0).abs()
    kw = dict(logps=maybe_nan(data, g, logps), old_logps=logps + randn(g, B, T, scale=0.2),
              advantages=randn(g, B), mask=(torch.rand(B, T, generator=g) > 0.3).float(),
              loss_type=data.draw(st.sampled_from(LOSS_TYPES)),
              beta=data.draw(st.sampled_from([0.0, 0.1])), ref_logps=logps + randn(g, B, T, scale=0.1),
              epsilon_low=0.2, epsilon_high=data.draw(st.sampled_from([None, 0.28])))
    bad = {"advantages": [lambda k: k["advantages"] > 0, lambda k: k["advantages"] * 1j,
                          lambda k: k["advantages"][:0], lambda k: k["advantages"].tolist()],
           "mask": [lambda k: k["mask"] * 1j, lambda k: k["mask"][:, :0]],
           "old_logps": [lambda k: k["old_logps"].long(), lambda k: k["old_logps"].tolist()],
           "epsilon_low": [2.0, -0.1, NAN], "epsilon_high": [-1.0, INF], "dual_clip": [0.5, NAN],
           "normalizer": [1e-300, 1e300, -1.0, NAN, torch.tensor([1.0, 2.0]), torch.tensor(NAN)],
           "beta": [-0.1, NAN], "ref_logps": [None], "loss_type": ["ppo"], "kl_estimator": ["k4"],
           "importance_sampling_level": ["batch"], "cispo_max": [0.0, -1.0]}
    kw, name = mutate(data, kw, bad)
    if name == "ref_logps":
        kw["beta"] = 0.5
    return "ptcore.ops.policy_loss", kw, ["logps", "old_logps", "advantages", "mask"], None


def op_group_advantages(data):
    g = _gen(data)
    gs, G = data.draw(st.integers(1, 4), label="group_size"), data.draw(st.integers(0, 3), label="G")
    dt = _dtype(data, (torch.float32, torch.float64))
    r = randn(g, gs * G, dtype=dt)
    if r.numel() and data.draw(st.booleans(), label="nan reward"):
        r[0] = NAN
    kw = dict(rewards=r, group_size=gs, estimator=data.draw(st.sampled_from(["grpo", "rloo", "reinforce_pp"])),
              scale=data.draw(st.sampled_from(["group", "batch", "none"])))
    bad = {"rewards": [lambda k: torch.cat([k["rewards"], torch.tensor([INF], dtype=dt)]) if gs == 1 else k["rewards"].bool(),
                       lambda k: k["rewards"] * 1j, lambda k: k["rewards"].tolist(), lambda k: k["rewards"][None]],
           "group_size": [0, gs + 0.5, True, gs * G + 1 if G else 3], "eps": [NAN, -1.0, INF],
           "estimator": ["ppo"], "scale": ["row"]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.group_advantages", kw, ["rewards"], None


def op_gae(data):
    g = _gen(data)
    B, T = data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(0, 4), label="T")
    kw = dict(rewards=maybe_nan(data, g, randn(g, B, T)), values=randn(g, B, T),
              mask=(torch.rand(B, T, generator=g) > 0.3).long(),
              gamma=data.draw(st.sampled_from([0.0, 0.9, 1.0])), lam=data.draw(st.sampled_from([0.5, 1.0])))
    bad = {"gamma": [1.5, NAN, -0.1, True], "lam": [INF, 2.0], "mask": [lambda k: k["mask"] * 1j, lambda k: k["mask"][:1]],
           "values": [lambda k: k["values"][:, :0] if T else torch.zeros(1), lambda k: k["values"].tolist()],
           "rewards": [lambda k: k["rewards"].long(), lambda k: k["rewards"][0]]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.gae", kw, ["rewards", "values", "mask"], None


def op_linear_policy_loss(data):
    from ptcore.ops.policy import LOSS_TYPES
    g = _gen(data)
    B, T, H, V = (data.draw(st.integers(1, hi), label=n) for n, hi in (("B", 2), ("T", 3), ("H", 4), ("V", 5)))
    dt = _dtype(data, (torch.float32, torch.float64))
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    kw = dict(hidden=maybe_nan(data, g, randn(g, B, T, H, dtype=dt), (NAN,)), weight=randn(g, V, H, dtype=dt),
              target=torch.randint(0, V, (B, T), generator=g), old_logps=-randn(g, B, T, scale=2.0).abs(),
              advantages=randn(g, B), mask=mask, loss_type=data.draw(st.sampled_from(LOSS_TYPES)),
              temperature=data.draw(st.sampled_from([0.7, 1.0])))
    bad = {"advantages": [lambda k: k["advantages"] > 0, lambda k: k["advantages"].tolist()],
           "old_logps": [lambda k: k["old_logps"].long(), lambda k: k["old_logps"][:, :0], lambda k: [0.0]],
           "mask": [lambda k: k["mask"] * 1j, [1]], "temperature": [0.0, NAN, "1"],
           "target": [lambda k: k["target"] + V, lambda k: k["target"].bool()], "normalizer": [1e-300, NAN, -2.0],
           "epsilon_low": [5.0], "ignore_index": [2**63]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.linear_policy_loss", kw, ["hidden", "weight", "target", "old_logps", "advantages", "mask"], _backend(data)


def op_linear_dpo_loss(data):
    g = _gen(data)
    B, T, H, V = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("B", 0, 2), ("T", 1, 3), ("H", 1, 4), ("V", 1, 5)))
    dt = _dtype(data, (torch.float32, torch.float64))
    tgt = lambda: torch.randint(0, V, (B, T), generator=g)
    kw = dict(chosen_hidden=maybe_nan(data, g, randn(g, B, T, H, dtype=dt), (NAN,)), rejected_hidden=randn(g, B, T, H, dtype=dt),
              weight=randn(g, V, H, dtype=dt), chosen_target=tgt(), rejected_target=tgt(),
              ref_chosen_logps=-randn(g, B, scale=3.0).abs(), ref_rejected_logps=-randn(g, B, scale=3.0).abs(),
              beta=data.draw(st.sampled_from([0.1, 1.0])),
              loss_type=data.draw(st.sampled_from(["sigmoid", "ipo", "hinge", "simpo", "orpo", "apo_zero"])))
    bad = {"beta": [NAN, -1.0, 1e300], "chosen_target": [lambda k: k["chosen_target"] + V, lambda k: k["chosen_target"][:, :0]],
           "weight": [lambda k: k["weight"][:, :0], lambda k: k["weight"].tolist()], "loss_type": ["x"],
           "ref_chosen_logps": [lambda k: k["ref_chosen_logps"][:0] if B else torch.zeros(1)], "temperature": [0.0, INF]}
    kw, _ = mutate(data, kw, bad)
    return ("ptcore.ops.linear_dpo_loss", kw, ["chosen_hidden", "rejected_hidden", "weight", "chosen_target",
                                               "rejected_target", "ref_chosen_logps", "ref_rejected_logps"], _backend(data))


def _paged_kw(data, g):
    B = data.draw(st.integers(1, 3), label="B")
    Hkv, G, D, S = (data.draw(st.integers(1, hi), label=n) for n, hi in (("Hkv", 2), ("G", 2), ("D", 4), ("page_size", 4)))
    pages_per = data.draw(st.integers(1, 3), label="pages per sequence")
    P = B * pages_per
    dt = _dtype(data)
    bt = torch.randperm(P, generator=g).reshape(B, pages_per).int()
    lens = torch.randint(1, pages_per * S + 1, (B,), generator=g).int()
    return dict(k_cache=randn(g, P, S, Hkv, D, dtype=dt), v_cache=randn(g, P, S, Hkv, D, dtype=dt),
                block_table=bt, seq_lens=lens,
                scale=data.draw(st.sampled_from([None, 0.5])), softcap=data.draw(st.sampled_from([None, 10.0]))), B, Hkv * G, D, dt


PAGED_BAD = {"block_table": [lambda k: k["block_table"] + 100, lambda k: k["block_table"].long(), lambda k: k["block_table"][:, :0]],
             "seq_lens": [lambda k: k["seq_lens"] + 1000, lambda k: k["seq_lens"] * 0 - 1, lambda k: k["seq_lens"].tolist()],
             "scale": [NAN, INF, 1e300, True], "softcap": [0.0, -1.0, 1e300, NAN],
             "k_cache": [lambda k: k["k_cache"][..., :1, :] if k["k_cache"].shape[2] > 1 else k["k_cache"].double(),
                         lambda k: k["k_cache"].to("meta")]}


def op_paged_attention_decode(data):
    g = _gen(data)
    kw, B, Hq, D, dt = _paged_kw(data, g)
    kw = dict(q=maybe_nan(data, g, randn(g, B, Hq, D, dtype=dt)), **kw)
    kw, _ = mutate(data, kw, {**PAGED_BAD, "q": [lambda k: k["q"][:, :, :0], lambda k: k["q"].tolist()]})
    return "ptcore.ops.paged_attention_decode", kw, ["q", "k_cache", "v_cache", "block_table", "seq_lens"], _backend(data)


def op_paged_attention_extend(data):
    g = _gen(data)
    kw, B, Hq, D, dt = _paged_kw(data, g)
    qlens = [int(torch.randint(0, int(n) + 1, (1,), generator=g)) for n in kw["seq_lens"]]
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    kw = dict(q=maybe_nan(data, g, randn(g, int(cu[-1]), Hq, D, dtype=dt)), **kw)
    kw["cu_seqlens_q"] = cu
    order = ["q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q"]
    kw = {k: kw[k] for k in order + ["scale", "softcap"]}
    kw, _ = mutate(data, kw, {**PAGED_BAD, "cu_seqlens_q": [lambda k: k["cu_seqlens_q"].flip(0), lambda k: k["cu_seqlens_q"][1:]],
                              "tree_mask": [[[True]], lambda k: torch.ones(1, 1)]})
    return "ptcore.ops.paged_attention_extend", kw, order, _backend(data)


def op_write_kv(data):
    g = _gen(data)
    P, S, Hkv, D = (data.draw(st.integers(1, hi), label=n) for n, hi in (("pages", 3), ("page_size", 4), ("Hkv", 2), ("D", 3)))
    dt = _dtype(data)
    T = data.draw(st.integers(0, P * S), label="T")
    slots = torch.randperm(P * S, generator=g)[:T]
    kw = dict(k_cache=randn(g, P, S, Hkv, D, dtype=dt), v_cache=randn(g, P, S, Hkv, D, dtype=dt), slots=slots,
              k=randn(g, T, Hkv, D, dtype=dt), v=randn(g, T, Hkv, D, dtype=dt))
    bad = {"k_cache": [lambda k: k["k_cache"][:1].expand_as(k["k_cache"]) if P > 1 else k["k_cache"][..., :1, :, :].expand_as(k["k_cache"]) if S > 1 else k["k_cache"].double(),
                       lambda k: k["k_cache"].tolist()],
           "slots": [lambda k: k["slots"] + P * S, lambda k: k["slots"] - P * S, lambda k: k["slots"].int(), lambda k: k["slots"].float()],
           "k": [lambda k: k["k"].double() if dt != torch.float64 else k["k"].float(), lambda k: k["k"][:, :, :0]]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.write_kv", kw, ["k_cache", "v_cache", "slots", "k", "v"], None


def op_speculative_verify(data):
    g = _gen(data)
    B, K, V = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("B", 0, 3), ("K", 0, 3), ("V", 1, 6)))
    dt = _dtype(data, (torch.float32, torch.float64))
    p = torch.rand(B, K + 1, V, generator=g, dtype=torch.float64)
    kw = dict(draft_tokens=torch.randint(0, V, (B, K), generator=g), draft_probs=None,
              target_probs=(p / p.sum(-1, keepdim=True)).to(dt), greedy=True,
              draft_lens=torch.randint(0, K + 1, (B,), generator=g))
    bad = {"draft_lens": [lambda k: [x + 0.5 for x in k["draft_lens"].tolist()], lambda k: k["draft_lens"] + K + 1,
                          lambda k: k["draft_lens"].bool()],
           "draft_tokens": [lambda k: k["draft_tokens"] + V, lambda k: k["draft_tokens"].bool(), lambda k: k["draft_tokens"].tolist()],
           "target_probs": [lambda k: k["target_probs"] * NAN, lambda k: -k["target_probs"], lambda k: k["target_probs"][:, :1]],
           "greedy": ["no", 1], "validate": ["no"]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.speculative_verify", kw, ["draft_tokens", "draft_probs", "target_probs"], _backend(data)


def op_copy_pages(data):
    g = _gen(data)
    L, P, S = (data.draw(st.integers(1, hi), label=n) for n, hi in (("L", 2), ("pages", 4), ("page_size", 3)))
    dt = _dtype(data)
    n = data.draw(st.integers(0, P), label="n")
    dst = torch.randperm(P, generator=g)[:n]
    src = torch.randint(0, P, (n,), generator=g)
    kw = dict(k_pool=randn(g, L, P, S, 1, 2, dtype=dt), v_pool=randn(g, L, P, S, 1, 2, dtype=dt), src=src, dst=dst)
    bad = {"dst": [lambda k: torch.cat([k["dst"], k["dst"][:1]]) if n else torch.tensor([P]),
                   lambda k: k["dst"] + P, lambda k: k["dst"].float(), lambda k: k["dst"].tolist()],
           "src": [lambda k: k["src"] - P - 1 if n else torch.tensor([-1]), lambda k: k["src"][:0] if n else torch.tensor([0])],
           "v_pool": [lambda k: k["v_pool"][:, :1].expand_as(k["v_pool"]) if P > 1 else k["v_pool"].double()]}
    kw, _ = mutate(data, kw, bad)
    return "ptcore.ops.copy_pages", kw, ["k_pool", "v_pool", "src", "dst"], None


def op_speculative_verify_tree(data):
    g = _gen(data)
    B, N, V = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("B", 0, 2), ("N", 1, 4), ("V", 1, 5)))
    dt = _dtype(data, (torch.float32, torch.float64))
    parents = torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, N)])
    p = torch.rand(B, N + 1, V, generator=g, dtype=torch.float64)
    kw = dict(tree_tokens=torch.randint(0, V, (B, N), generator=g), parents=parents, draft_probs=None,
              target_probs=(p / p.sum(-1, keepdim=True)).to(dt), greedy=True)
    bad = {"parents": [lambda k: k["parents"] + N, lambda k: k["parents"].float(), lambda k: k["parents"][:0]],
           "tree_tokens": [lambda k: k["tree_tokens"] - V - 1, lambda k: k["tree_tokens"].bool()],
           "target_probs": [lambda k: k["target_probs"] * NAN], "greedy": ["yes"], "validate": [2]}
    kw, _ = mutate(data, kw, bad)
    return ("ptcore.ops.speculative_verify_tree", kw, ["tree_tokens", "parents", "draft_probs", "target_probs"],
            _backend(data))


def op_kl_penalty(data):
    g = _gen(data)
    shape = (data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(0, 3), label="T"))
    dt = _dtype(data)
    kw = dict(logps=maybe_nan(data, g, -randn(g, *shape, dtype=dt).abs()), ref_logps=-randn(g, *shape, dtype=dt).abs(),
              estimator=data.draw(st.sampled_from(["k1", "k2", "k3"])))
    kw, _ = mutate(data, kw, {"estimator": ["k4", None], "ref_logps": [lambda k: k["ref_logps"][:0]]})
    return "ptcore.ops.kl_penalty", kw, ["logps", "ref_logps"], None


OPS = {f.__name__[3:]: f for f in (op_copy_pages, op_speculative_verify_tree, op_kl_penalty, op_linear_cross_entropy, op_linear_logprobs, op_dpo_loss, op_policy_loss,
                                   op_group_advantages, op_gae, op_linear_policy_loss, op_linear_dpo_loss,
                                   op_paged_attention_decode, op_paged_attention_extend, op_write_kv,
                                   op_speculative_verify)}


# ---- judging an outcome ----

def to64(x):
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64, copy=True) if x.is_floating_point() else x.clone()  # a copy: ops
        # that write in place must not touch the case's own tensors
    if isinstance(x, list):
        return [to64(v) for v in x]
    return x


def call(target, kw, positional, backend):
    args = [kw[n] for n in positional]
    rest = {k: v for k, v in kw.items() if k not in positional}
    with ptcore.use_backend(backend) if backend else _null():
        return resolve(target)(*args, **rest), args


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *e):
        return False


def tensors(result):
    """The tensors to compare: a loss output's loss (and rewards); every tensor otherwise."""
    if hasattr(result, "loss") and hasattr(result, "metrics"):
        keep = [result.loss] + [getattr(result, k) for k in ("chosen_rewards", "rejected_rewards") if hasattr(result, k)]
        return [t for t in keep if isinstance(t, torch.Tensor)]
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [t for r in result for t in tensors(r)]
    return []


def lowest_dtype(kw):
    """The least precise floating dtype among the case's tensors (float64 if none): the rule's
    slack is that dtype's."""
    dts = [v.dtype for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return max(dts, key=lambda d: torch.finfo(d).eps, default=torch.float64)


def copies(x):
    """The case's own values (same dtype), copied: ops that write in place must not touch them."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, list):
        return [copies(v) for v in x]
    return x


def in_process(target, kw, positional, backend, env, returned):
    """(the op's tensors, None) or (None, the exception), run here with ``env`` set."""
    try:
        for k, v in env.items():
            os.environ[k] = v
        result, args = call(target, kw, positional, backend)
        return ([args[i] for i in returned] if returned else result), None
    except (ValueError, TypeError) as e:
        return None, e
    finally:
        for k in env:
            os.environ.pop(k, None)


def describe(target, kw, backend, env=None):
    def d(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)} {v.dtype} {'stride ' + str(v.stride()) if not v.is_contiguous() else ''}"
        return repr(v)
    return (f"{target}(" + ", ".join(f"{k}={d(v)}" for k, v in kw.items()) + f") backend={backend}"
            + (f" env={env}" if env else ""))


def names_an_argument(target, message, kw, env):
    try:
        params = list(inspect.signature(resolve(target)).parameters)
    except (TypeError, ValueError):
        params = list(kw)
    return any(f"'{p}'" in message or f" {p} " in message or message.startswith(p) for p in params + list(env))


def check(worker, op, target, kw, positional, backend, env=None, returned=None):
    env = env or {}
    case_text = describe(target, kw, backend, env)
    # the float64 reference, in this process (plain PyTorch)
    ref, ref_err = in_process(target, {k: to64(v) for k, v in kw.items()}, positional,
                              "torch" if backend else None, env, returned)
    args = [kw[n] for n in positional]
    rest = {k: v for k, v in kw.items() if k not in positional}
    outcome = worker.run((target, args, rest, backend, env, returned))
    counts = STATS.setdefault(op, {})
    kind = outcome[0] if outcome[0] != "raised" else f"raised {outcome[1]}"
    counts[kind] = counts.get(kind, 0) + 1
    if outcome[0] in ("hang", "crash"):
        pytest.fail(f"{outcome[0]}: {case_text}\n{outcome[1]}")
    if outcome[0] == "raised":
        _, typ, msg = outcome
        if os.environ.get("PTCORE_FUZZ_VERBOSE"):
            print(f"[{op}] {typ}: {msg[:160]}")
        assert typ in ACCEPTED, f"{typ} ({msg}) instead of ValueError/TypeError for {case_text}"
        assert names_an_argument(target, msg, kw, env), f"the message names no argument: {msg!r} for {case_text}"
        return
    assert ref_err is None, (f"accepted what the float64 reference rejects ({type(ref_err).__name__}: "
                             f"{ref_err}) for {case_text}")
    got, want = tensors(outcome[1]), tensors(ref)
    assert len(got) == len(want), case_text
    dtype = lowest_dtype(kw)
    # the rule's naive baseline: the op in the case's own dtype, plain PyTorch (for the torch backend
    # and ops without backends that is the worker's own code: the worker must reproduce it)
    if dtype != torch.float64:
        naive, naive_err = in_process(target, {k: copies(v) for k, v in kw.items()}, positional,
                                      "torch" if backend else None, env, returned)
        assert naive_err is None, f"the plain {dtype} computation raised {naive_err!r} for {case_text}"
        naive = tensors(naive)
        assert len(naive) == len(want), case_text
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)} for {case_text}"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{a} != {b} for {case_text}"
            continue
        a, b = a.double(), b.double()
        # Non-finite exactly where the reference is (NaN and ±inf are not told apart: with an inf
        # input, the torch reference's entropy of a row whose logits are all -inf is -inf where
        # the kernels give NaN); finite values close.
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), \
            f"non-finite where the reference is finite, or finite where it is not: {a} vs {b} for {case_text}"
        fin = torch.isfinite(b)
        if dtype == torch.float64:  # float64 throughout: no lower dtype for a naive baseline; a
            # float64 bound, orders above float64 rounding at these sizes, below any wrong formula
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-7, atol=1e-7, msg=lambda m: f"{m}\nfor {case_text}")
            continue
        n = naive[i].double()[fin]
        assert torch.isfinite(n).all(), f"the plain {dtype} computation is not finite where the reference is for {case_text}"
        err, bound = rel_err(a[fin], b[fin]), rule_bound(n, b[fin], dtype)
        assert err <= bound, (f"rel error {err:.3g} vs float64 > 2 x the plain {dtype} computation's "
                              f"{rel_err(n, b[fin]):.3g} + {SLACK[dtype]:g}: {a} vs {b} for {case_text}")


@pytest.fixture(scope="module")
def fuzz_scale(request):
    return float(request.config.getoption("--fuzz-scale", default=1.0) or 1.0)


@pytest.mark.parametrize("op", sorted(OPS))
def test_fuzz_op(op, worker, fuzz_scale):
    if OPS[op] in (op_paged_attention_decode, op_paged_attention_extend, op_speculative_verify,
                   op_speculative_verify_tree):
        pytest.importorskip("ptcore._C", reason="ptcore._C is not built (the cpu backend)")

    @settings(max_examples=max(1, int(BASE_EXAMPLES * fuzz_scale)), deadline=None, database=None,
              derandomize=fuzz_scale <= 1, phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def run(data):
        target, kw, positional, backend = OPS[op](data)
        returned = [0, 1] if op in ("write_kv", "copy_pages") else None
        check(worker, op, target, kw, positional, backend, returned=returned)

    run()


@pytest.mark.parametrize("value", ["inf", "0", "-1", "nan", "1e30", "abc", "0.01"])
def test_fuzz_chunk_mb_environment(worker, value):
    g = torch.Generator().manual_seed(0)
    kw = dict(input=randn(g, 3, 4), weight=randn(g, 5, 4), target=torch.tensor([0, 4, -100]))
    check(worker, "chunk_mb", "ptcore.ops.linear_cross_entropy", kw, ["input", "weight", "target"], "cpu",
          env={"PTCORE_CHUNK_MB": value})


@pytest.fixture(scope="module")
def _cpp_radix():
    pytest.importorskip("ptcore._C", reason="ptcore._C is not built (the C++ radix cache)")


def test_fuzz_radix_cache(worker, fuzz_scale, _cpp_radix):
    """Random programs of insert / match_prefix / evict / owned_slots with valid and bad tokens
    and slots (misaligned, negative, near 2**63, wrong lengths, floats, bools): the C++ cache,
    in the worker, answers exactly as its Python oracle (tests/radix_oracle.py) does here, and
    every error is a ValueError / TypeError naming its argument."""
    from tests.fuzz_worker import radix_program

    @settings(max_examples=max(1, int(BASE_EXAMPLES * fuzz_scale)), deadline=None, database=None,
              derandomize=fuzz_scale <= 1, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        P = data.draw(st.sampled_from([1, 2, 3, 4]), label="page_size")
        next_page, program = 0, []
        for _ in range(data.draw(st.integers(1, 8), label="calls")):
            kind = data.draw(st.sampled_from(["insert", "insert", "match_prefix", "evict", "owned_slots"]))
            tokens = data.draw(st.lists(st.integers(0, 5), max_size=7), label="tokens")
            if kind == "insert":
                pages = -(-len(tokens) // P)
                slots = [(next_page + i // P) * P + i % P for i in range(len(tokens))]
                next_page += pages
                how = data.draw(st.sampled_from(["good"] * 4 + ["random", "huge", "negative", "short", "float", "bool"]))
                if how == "random":
                    slots = data.draw(st.lists(st.integers(0, 40), min_size=len(tokens), max_size=len(tokens)))
                elif how == "huge" and slots:
                    base = data.draw(st.sampled_from([2**63 - P, 2**63 - 2 * P, (2**63 - 1) // P * P]))
                    slots = [base + i for i in range(len(tokens))]
                elif how == "negative" and slots:
                    slots[0] = -1
                elif how == "short":
                    slots = slots[:-1] if slots else [0]
                elif how == "float" and slots:
                    slots = [float(s) + 0.5 for s in slots]
                elif how == "bool":
                    tokens = [True] * len(tokens)
                program.append(("insert", tokens, slots))
            elif kind == "match_prefix":
                program.append(("match_prefix", data.draw(st.sampled_from([tokens, [-1], [2**63], "ab", [0.5]]))))
            elif kind == "evict":
                program.append(("evict", data.draw(st.sampled_from([0, 1, 5, 100, -1, 1.5, True]))))
            else:
                program.append(("owned_slots",))
        want = radix_program("model", P, program)
        outcome = worker.run(("tests.fuzz_worker.radix_program", ["cpp", P, program], {}, None, {}, None))
        counts = STATS.setdefault("radix_cache", {})
        counts["programs"] = counts.get("programs", 0) + 1
        text = f"RadixCache(page_size={P}) program {program}"
        if outcome[0] in ("hang", "crash"):
            pytest.fail(f"{outcome[0]}: {text}\n{outcome[1]}")
        assert outcome[0] == "ok", f"{outcome} for {text}"
        got = outcome[1]
        for i, (g, w) in enumerate(zip(got, want)):
            counts[f"calls {g[0]}"] = counts.get(f"calls {g[0]}", 0) + 1
            where = f"call {i} {program[i][0]} of {text}"
            assert g[0] == w[0], f"C++ {g} but the oracle {w} at {where}"
            if g[0] == "ok":
                assert g[1] == w[1], f"C++ {g[1]} but the oracle {w[1]} at {where}"
            else:
                assert g[1] in ACCEPTED, f"{g[1]}: {g[2]} at {where}"
                assert any(n in g[2] for n in ("tokens", "slots", "num_slots", "page")), f"{g[2]!r} names nothing at {where}"

    run()


def test_the_worker_reports_a_crash_and_a_hang():
    """The harness itself: a case that aborts the process or never returns is reported as such
    (and the next case runs in a fresh worker)."""
    w = Worker()
    try:
        kind, text = w.run(("os.abort", [], {}, None, {}, None))
        assert kind == "crash" and "exit status" in text
        assert w.run(("time.sleep", [60], {}, None, {}, None), timeout=2)[0] == "hang"
        assert w.run(("math.sqrt", [4.0], {}, None, {}, None)) == ("ok", 2.0)
    finally:
        w.stop()
