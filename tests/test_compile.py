"""torch.compile traces the op as a custom op: same result, no graph break."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_cross_entropy


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
    assert torch.allclose(out_c, out_e, rtol=1e-6)
    assert torch.allclose(gx_c, gx_e, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gw_c, gw_e, rtol=1e-5, atol=1e-7)


def test_custom_op_registered_with_fake_impl():
    """opcheck: schema, fake (meta) implementation and autograd registration are consistent."""
    x, w, t = torch.randn(5, 8), torch.randn(12, 8), torch.randint(0, 12, (5,))
    op = torch.ops.ptcore.linear_cross_entropy.default
    args = (x, w, t, None, -100, 0.0, 0.0, 0.0, "mean", "torch", 2, True, True, False)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
