"""torch.compile traces the op as a custom op: same result, no graph break."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_cross_entropy
from tests.reference import assert_rule, linear_cross_entropy_ref, rel_err, rule_bound


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    torch._dynamo.reset()
    x = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(90, 16, requires_grad=True)
    t = torch.randint(0, 90, (2, 7))
    t[0, 0] = -100

    def f(x, w, t):
        loss = linear_cross_entropy(torch.tanh(x), w, t, label_smoothing=0.1, softcap=10.0, reduction=reduction)
        return (loss * 2).sum()

    # fullgraph: a graph break raises. Inductor for the real path, aot_eager for the cheap one.
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if reduction == "mean" else "aot_eager")
    out_c = compiled(x, w, t)
    gx_c, gw_c = torch.autograd.grad(out_c, (x, w))
    out_e = f(x, w, t)
    gx_e, gw_e = torch.autograd.grad(out_e, (x, w))
    # Compiled and eager: each within the tolerance rule of a float64 run of the same function
    # (tests/reference.py), and from each other by at most half the rule's bound.
    def plain(dtype):  # float64: the oracle; float32: the naive baseline
        x_, w_ = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        loss = linear_cross_entropy_ref(torch.tanh(x_), w_, t, label_smoothing=0.1, softcap=10.0,
                                        reduction=reduction)
        out = (loss * 2).sum()
        return (out, *torch.autograd.grad(out, (x_, w_)))

    refs, naives = plain(torch.float64), plain(torch.float32)
    for name, c, e, ref, naive in zip(("loss", "grad_x", "grad_w"), (out_c, gx_c, gw_c), (out_e, gx_e, gw_e),
                                      refs, naives):
        assert_rule(c, ref, naive, f"compiled {name}")
        assert_rule(e, ref, naive, f"eager {name}")
        assert rel_err(c, e) <= rule_bound(naive, ref) / 2, name


def test_custom_op_registered_with_fake_impl():
    """opcheck: schema, fake (meta) implementation and autograd registration are consistent."""
    x, w, t = torch.randn(5, 8), torch.randn(12, 8), torch.randint(0, 12, (5,))
    op = torch.ops.ptcore.linear_cross_entropy.default
    args = (x, w, t, None, -100, 0.0, 0.0, 0.0, "mean", "torch", 2, True, True, False)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
