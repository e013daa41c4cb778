"""The GPU backends (triton, cuda) on CUDA tensors against the float64 oracle. They run where a
CUDA device is visible (bench/gpu_check.sh on a lent GPU) and skip, saying so, elsewhere."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_cross_entropy, linear_dpo_loss, linear_logprobs, linear_policy_loss
from tests.reference import linear_cross_entropy_ref, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the gpu tests run in bench/gpu_check.sh")
GPU_BACKENDS = ["triton", "cuda"]


def need(backend, dtype=torch.float32):
    why = ptcore.ops.dispatch.cannot_run(backend, torch.device("cuda"), dtype)
    if why:
        pytest.fail(f"gpu backend {backend} cannot run on a CUDA machine: {why}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)], ids=["plain", "all"])
def test_gpu_cross_entropy(backend, dtype, opts):
    need(backend, dtype)
    N, H, V = 257, 96, 50257
    x = torch.randn(N, H, device="cuda")
    w = torch.randn(V, H, device="cuda") * (3 / H ** 0.5)
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = -100
    params = [x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
    with ptcore.use_backend(backend):
        loss = linear_cross_entropy(*params, t, **opts)
    grads = torch.autograd.grad(loss, params)
    ref_p = [x.double().requires_grad_(), w.double().requires_grad_()]
    ref = linear_cross_entropy_ref(*ref_p, t, **opts)
    ref_g = torch.autograd.grad(ref, ref_p)
    naive_p = [x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
    naive = linear_cross_entropy_ref(*naive_p, t, **opts)
    naive_g = torch.autograd.grad(naive, naive_p)
    slack = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, ref) <= (0 if dtype == torch.float32 else rel_err(naive, ref)) + slack
    for g, r, n in zip(grads, ref_g, naive_g):
        assert rel_err(g, r) <= (0 if dtype == torch.float32 else rel_err(n, r)) + slack


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_logprobs_and_out_of_range_target_is_nan(backend):
    need(backend)
    N, H, V = 129, 64, 32001
    x = torch.randn(N, H, device="cuda", requires_grad=True)
    w = torch.randn(V, H, device="cuda") / H ** 0.5
    t = torch.randint(0, V, (N,), device="cuda")
    t[:5] = -100
    with ptcore.use_backend(backend):
        lp, ent = linear_logprobs(x, w, t, temperature=0.7, return_entropy=True)
    g = torch.autograd.grad(lp.sum() + ent.sum(), x)[0]
    xd = x.detach().double().requires_grad_()
    logs = torch.log_softmax((xd @ w.double().T) / 0.7, -1)
    valid = t != -100
    rlp = torch.where(valid, logs.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0)
    rent = torch.where(valid, -(logs.exp() * logs).sum(-1), 0)
    rg = torch.autograd.grad(rlp.sum() + rent.sum(), xd)[0]
    assert rel_err(lp, rlp) < 1e-5 and rel_err(ent, rent) < 1e-5 and rel_err(g, rg) < 1e-5
    t_bad = t.clone()
    t_bad[7] = V + 3  # cannot raise without a host sync: the row is NaN, never a finite lie
    with ptcore.use_backend(backend):
        lp_bad = linear_logprobs(x.detach(), w, t_bad)
    assert torch.isnan(lp_bad[7]) and torch.isfinite(lp_bad[8:]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_fused_losses_match_cpu(backend):
    need(backend)
    B, T, H, V = 4, 33, 32, 4099
    h = torch.randn(B, T, H)
    w = torch.randn(V, H) / H ** 0.5
    y = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[:, :5] = 0
    old, adv = torch.randn(B, T) - 8, torch.randn(B)
    outs = []
    for device, bk in (("cpu", "cpu"), ("cuda", backend)):
        hd = h.to(device).requires_grad_()
        with ptcore.use_backend(bk):
            out = linear_policy_loss(hd, w.to(device), y.to(device), old.to(device), adv.to(device),
                                     mask.to(device), loss_type="grpo")
            dpo = linear_dpo_loss(hd[:2], hd[2:], w.to(device), y[:2].to(device), y[2:].to(device),
                                  torch.zeros(2, device=device), torch.zeros(2, device=device))
        outs.append((out.loss, dpo.loss, torch.autograd.grad(out.loss + dpo.loss, hd)[0]))
    (a, b, g), (c, d, k) = outs
    assert abs(float(a) - float(c)) < 1e-4 and abs(float(b) - float(d)) < 1e-4
    assert rel_err(k.cpu(), g) < 1e-4
