"""Bad input gets a clear Python exception that names the argument: from the Python layer, and
again from the C++ layer when it is called directly."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_cross_entropy
from tests.conftest import cpu_backends


def good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case, exc, pattern", [
    (lambda x, w, t: (x[:, :7], w, t, {}), ValueError, "'weight' must be"),
    (lambda x, w, t: (x, w, t.int(), {}), TypeError, "'target' must have dtype"),
    (lambda x, w, t: (x, w, t.float(), {}), TypeError, "'target' must have dtype"),
    (lambda x, w, t: (x, w, t[:3], {}), ValueError, "'target' must have shape"),
    (lambda x, w, t: (x, w, torch.tensor([0, 1, 10, 2]), {}), ValueError, "'target' holds 10"),
    (lambda x, w, t: (x, w, torch.tensor([0, -1, 3, 2]), {}), ValueError, "'target' holds -1"),
    (lambda x, w, t: (x, w, t, {"bias": torch.randn(9)}), ValueError, "'bias' must have length"),
    (lambda x, w, t: (x, w, t, {"bias": torch.randn(10, 1)}), ValueError, "'bias' must be 1-D"),
    (lambda x, w, t: (x, w.double(), t, {}), TypeError, "'weight' has dtype"),
    (lambda x, w, t: (x.long(), w, t, {}), TypeError, "'input' must have dtype"),
    (lambda x, w, t: (x, w[0], t, {}), ValueError, "'weight' must be 2-D"),
    (lambda x, w, t: (x, w[:0], t, {}), ValueError, "V = 0"),
    (lambda x, w, t: (x, w, t, {"label_smoothing": 1.5}), ValueError, "'label_smoothing'"),
    (lambda x, w, t: (x, w, t, {"label_smoothing": -0.1}), ValueError, "'label_smoothing'"),
    (lambda x, w, t: (x, w, t, {"z_loss": -1.0}), ValueError, "'z_loss'"),
    (lambda x, w, t: (x, w, t, {"softcap": 0.0}), ValueError, "'softcap'"),
    (lambda x, w, t: (x, w, t, {"softcap": float("nan")}), ValueError, "'softcap'"),
    (lambda x, w, t: (x, w, t, {"reduction": "avg"}), ValueError, "'reduction'"),
    (lambda x, w, t: (x, w, t, {"ignore_index": 1.5}), TypeError, "'ignore_index'"),
    (lambda x, w, t: ([1.0], w, t, {}), TypeError, "'input' must be a torch.Tensor"),
    (lambda x, w, t: (x, w.to("meta"), t, {}), ValueError, "'weight' is on meta"),
])
def test_bad_arguments_named(backend, case, exc, pattern):
    x, w, t, kw = case(*good())
    with ptcore.use_backend(backend), pytest.raises(exc, match=pattern):
        linear_cross_entropy(x, w, t, **kw)


def test_cpp_layer_checks_again():
    """The compiled kernel raises ValueError itself when handed bad values (Python skipped)."""
    C = pytest.importorskip("ptcore._C", reason="ptcore._C is not built")
    logits = torch.randn(3, 5)
    t = torch.tensor([0, 7, 1])
    loss, lse = torch.empty(3), torch.empty(3)
    args = dict(logits=logits.data_ptr(), dtype="float32", rows=3, vocab=5, row_stride=5,
                target=t.data_ptr(), target_stride=1, loss=loss.data_ptr(), lse=lse.data_ptr(),
                scale=0, scale_stride=0, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                softcap=0.0, write_grad=True)
    with pytest.raises(ValueError, match="'target' holds 7 at row 1"):
        C.cross_entropy_rows(**args)
    t[1] = 2
    for bad, pattern in [(dict(dtype="int8"), "dtype 'int8'"), (dict(row_stride=4), "row stride"),
                         (dict(vocab=0), "'vocab'"), (dict(rows=-1), "'rows'"),
                         (dict(label_smoothing=2.0), "'label_smoothing'"), (dict(z_loss=-1.0), "'z_loss'"),
                         (dict(softcap=-1.0), "'softcap'"), (dict(target=0), "non-null")]:
        with pytest.raises(ValueError, match=pattern):
            C.cross_entropy_rows(**{**args, **bad})
    C.cross_entropy_rows(**args)
    assert torch.isfinite(loss).all()


def test_nan_logits_poison_the_row_not_hide():
    """A NaN in the inputs gives NaN in that row's loss on every backend, never a finite lie."""
    for backend in ("torch", "cpu"):
        x = torch.randn(3, 4)
        x[1, 2] = float("nan")
        with ptcore.use_backend(backend):
            loss = linear_cross_entropy(x, torch.randn(6, 4), torch.tensor([1, 2, 3]), reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), backend
