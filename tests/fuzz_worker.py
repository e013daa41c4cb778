"""The process tests/test_fuzz.py runs its cases in: it reads pickled cases from stdin and writes
pickled outcomes to stdout, so that a case that crashes (a segfault, an abort) or hangs kills
only this process, and the test reports the case. Run as ``python -m tests.fuzz_worker``.

A case: ``(target, args, kwargs, backend, env, returned)``; ``target`` names a public callable
(``ptcore.ops.linear_cross_entropy``); ``returned`` lists the positions of arguments to send back
after the call (ops that write in place). An outcome: ``("ok", result)`` with every tensor on the
CPU, or ``("raised", exception type name, message)``.
"""
import faulthandler
import importlib
import os
import pickle
import struct
import sys


def _read(f):
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _write(f, obj):
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _cpu(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_cpu(v) for v in x]
    return x


def resolve(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def main():
    faulthandler.enable(sys.stderr)  # a crash prints the C and Python stacks, which the test shows
    import torch
    torch.set_num_threads(1)
    import ptcore
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    while True:
        case = _read(inp)
        if case is None:
            return
        target, args, kwargs, backend, env, returned = case
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with ptcore.use_backend(backend) if backend else _null():
                result = resolve(target)(*args, **kwargs)
            if returned:
                result = [args[i] for i in returned]
            outcome = ("ok", _cpu(result))
        except Exception as e:  # noqa: BLE001 -- the test judges the type and the message
            outcome = ("raised", type(e).__name__, str(e))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _write(out, outcome)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()


def radix_program(impl: str, page_size: int, program):
    """Runs ``program`` (a list of ``(method, *args)``) on a fresh ``RadixCache`` (``impl``
    "cpp") or its Python oracle ("model"); returns each call's outcome, going on after errors."""
    if impl == "cpp":
        from ptcore.cache import RadixCache as cls
    else:
        from tests.radix_oracle import RadixModel as cls
    cache = cls(page_size=page_size)
    out = []
    for method, *args in program:
        try:
            r = getattr(cache, method)(*args)
            out.append(["ok", [r.length, list(r.slots)] if hasattr(r, "length") else
                        (sorted(r) if isinstance(r, list) else r)])
        except Exception as e:  # noqa: BLE001 -- judged by the test
            out.append(["raised", type(e).__name__, str(e)])
    return out
