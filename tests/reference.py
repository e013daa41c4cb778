"""The float64 oracle for the fused losses: full logits in plain PyTorch (fine at test sizes),
written from docs/kernels.md sections 1-2 independently of ptcore's code."""
import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(x, w, t, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                             z_loss=0.0, softcap=None, reduction="mean"):
    """Same dtype as the inputs (call with float64 copies for the oracle, low precision for the
    naive baseline of the bf16 criterion)."""
    z = F.linear(x, w, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2, t2 = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    loss = F.cross_entropy(z2, t2, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    valid = t2 != ignore_index
    if z_loss:
        lse = torch.logsumexp(z2.float() if z2.dtype in (torch.bfloat16, torch.float16) else z2, -1)
        loss = loss + (z_loss * torch.where(valid, lse * lse, torch.zeros_like(lse))).to(loss.dtype)
    if reduction == "none":
        return loss.reshape(t.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    return float((out - ref).norm() / (denom if denom > 0 else 1.0))


# The tolerance rule (docs/kernels.md section 4), the one place tests take it from: a
# non-float64 result's error against the float64 oracle is at most twice the error of the naive
# PyTorch computation in the same dtype against the same oracle, plus a slack. Both errors come
# from the same machine, thread count and shapes, so the bound follows them; fixed constants
# (1e-5) flaked with vocabulary size, CPU and thread count while looser ones hid a 10x worse kernel.
SLACK = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rule_bound(naive, ref, dtype=None):
    """2 x rel_err(naive, ref) + the slack of ``dtype`` (default: naive's dtype)."""
    dtype = naive.dtype if dtype is None else dtype
    return 2.0 * rel_err(naive, ref) + SLACK[dtype]


def assert_rule(got, ref, naive, what="", dtype=None):
    """``got`` (low precision) against the float64 ``ref`` under the rule, ``naive`` being the plain
    PyTorch computation in got's dtype."""
    dtype = got.dtype if dtype is None else dtype
    err, bound = rel_err(got, ref), rule_bound(naive, ref, dtype)
    assert err <= bound, (f"{what}: rel error {err:.3g} vs float64 > 2 x naive {dtype} error "
                          f"{rel_err(naive, ref):.3g} + {SLACK[dtype]:g}")


def max_abs_bound(naive, ref):
    """The rule's per-token form, for metrics that take a max over tokens (log-prob differences):
    twice the naive fp32 computation's worst error against the float64 ``ref``, plus fp32's slack
    at the values' scale."""
    return 2 * float((naive.double() - ref).abs().max()) + SLACK[torch.float32] * max(1.0, float(ref.abs().max()))
