"""The portable CPU build and its run-time dispatch (csrc/build.py, ptcore/_ext.py): the default
build is not -march=native; every ISA variant built here loads (forced by PTCORE_CPU_ISA, one
subprocess each) and is within the tolerance rule of a float64 oracle (tests/reference.py: 2 x the
naive same-dtype computation's error + slack, measured in that process, so on that CPU and thread
count), float64 rows within 1e-10 of the float64 torch rows; the
baseline module holds no AVX instruction and every module exports only its PyInit; a variant the
CPU lacks, or an unknown one, is refused with a clear error, and the automatic choice falls back
to the best level the CPU runs."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ISAS = ("v2", "v3", "v4")
MODULE = {"v2": "ptcore._C", "v3": "ptcore._C_v3", "v4": "ptcore._C_v4"}
F64_TOL = 1e-10  # float64 kernels against the float64 torch rows: both float64, no rule needed


def _load_builder():
    spec = importlib.util.spec_from_file_location("ptcore_csrc_build", ROOT / "csrc" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _base():
    """ptcore._C, or a skip saying why it cannot be used here."""
    try:
        import ptcore._C as C
    except ImportError as e:
        pytest.skip(f"ptcore._C is not built ({e})")
    if getattr(C, "isa", None) not in ISAS:
        pytest.skip(f"ptcore._C was built as one module for -march={getattr(C, 'build_arch', '?')} "
                    "(PTCORE_CPU_ARCH), with no variants to dispatch between")
    return C


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PTCORE_CPU_ISA", "PTCORE_BACKEND")}
    env.update(extra)
    return env


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=600)


# ---------------------------------------------------------------------------------------------
# The build plan


def test_default_build_is_portable_not_native(tmp_path, monkeypatch):
    """Unset PTCORE_CPU_ARCH: _C at x86-64-v2 plus _C_v3 / _C_v4, no -march=native anywhere;
    PTCORE_CPU_ARCH=native is the one-module opt-in."""
    builder = _load_builder()
    monkeypatch.delenv("PTCORE_CPU_ARCH", raising=False)
    plan = builder.cpu_plan()
    if not builder._is_x86_64():
        assert plan == [("_C", "default", None)]
        pytest.skip("not x86-64: one _C at the compiler's default target, no ISA variants")
    assert plan == [("_C", "v2", "x86-64-v2"), ("_C_v3", "v3", "x86-64-v3"), ("_C_v4", "v4", "x86-64-v4")]
    assert builder.cpu_modules() == ["_C", "_C_v3", "_C_v4"]
    builder._write_ninja(tmp_path, None)
    ninja = (tmp_path / "build.ninja").read_text()
    assert "native" not in ninja
    for march in ("x86-64-v2", "x86-64-v3", "x86-64-v4"):
        assert f"-march={march}" in ninja
    # Every object is compiled at its module's level, and each module links only its level's objects.
    lines = ninja.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("build ") and ": cxx " in line:
            isa = Path(line.split()[1].rstrip(":")).parent.name
            assert lines[i + 1] == f"  archflags = -march={builder.ISA_LEVELS[isa]}", (line, lines[i + 1])
        if line.startswith("build ") and ": link " in line:
            out, objs = line.split(": link ")
            isa = {"_C": "v2", "_C_v3": "v3", "_C_v4": "v4"}[Path(out.split()[1]).name.split(".")[0]]
            assert {Path(o).parent.name for o in objs.split()} == {isa}, line
    assert builder.cpu_plan("native") == [("_C", "native", "native")]
    assert builder.cpu_plan("x86-64-v3") == [("_C", "x86-64-v3", "x86-64-v3")]
    assert builder.cpu_plan("portable") == plan
    (tmp_path / "n").mkdir()
    builder._write_ninja(tmp_path / "n", None, "native")
    assert "-march=native" in (tmp_path / "n" / "build.ninja").read_text()
    import ptcore._C as C
    print(f"installed ptcore._C: isa={getattr(C, 'isa', '?')} build_arch={getattr(C, 'build_arch', '?')}")


# ---------------------------------------------------------------------------------------------
# Each variant against float64 oracles under the tolerance rule, in its own process


def _worker() -> None:
    """Runs in the subprocess: the chosen variant, then for each comparison the cpu backend's rel
    error against a float64 oracle and its bound (JSON on the last line). The bound is the rule's,
    with fp32's slack for 16-bit storage too: every kernel accumulates in fp32, so a 16-bit output
    only adds its own rounding, which the naive 16-bit computation's error already contains."""
    import torch

    import ptcore
    from ptcore import _ext
    from ptcore.ops import (linear_cross_entropy, linear_logprobs, paged_attention_decode, paged_attention_extend,
                            speculative_verify, speculative_verify_tree)
    from ptcore.ops.rows import CROSS_ENTROPY_ROWS
    from tests.reference import linear_cross_entropy_ref, rel_err, rule_bound
    from tests.test_paged_attention import oracle

    def rule(got, ref, naive):
        """[rel error of got vs the float64 ref, 2 x naive's + fp32 slack]."""
        assert ref.dtype == torch.float64 and naive.dtype == got.dtype != torch.float64
        return [rel_err(got, ref), rule_bound(naive, ref, torch.float32)]

    def naive_logprobs(x, w, t, temperature=1.0, softcap=None):
        """Log-probs and entropy by the definition in x's dtype (float64: the oracle); 0 for
        ignored rows, as linear_logprobs."""
        z = x @ w.T
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        lsm = torch.log_softmax(z / temperature, -1)
        valid = t != -100
        lp = lsm.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
        ent = -(lsm.exp() * lsm).sum(-1)
        return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)

    torch.manual_seed(0)
    choice = _ext.cpu_variant()
    out = {"variant": choice, "module_file": _ext.cpu_module().__file__, "err": {}, "exact": {}}
    err, exact = out["err"], out["exact"]

    # The per-row cross-entropy pass, every dtype, a vocab with a vector tail, all options.
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for V in (77, 32001):
            n = 6
            z = (torch.randn(n, V) * 3).to(dtype)
            t = torch.tensor([3, -100, V - 1, 0, 40, 7])
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=8.0, write_grad=True)
            scale = torch.rand(n, dtype=acc)
            res = {}
            # ref: the torch rows in float64; naive: the torch rows in dtype (fp32 math)
            for b, zb, sb, ab in (("ref", z.double(), scale.double(), torch.float64), ("naive", z, scale, acc),
                                  ("cpu", z, scale, acc)):
                zz, loss, lse = zb.clone(), torch.empty(n, dtype=ab), torch.empty(n, dtype=ab)
                CROSS_ENTROPY_ROWS["cpu" if b == "cpu" else "torch"](zz, t, loss, lse, sb, **opts)
                res[b] = (zz, loss, lse)
            for i, what in enumerate(("grad", "loss", "lse")):
                got, ref, naive = res["cpu"][i], res["ref"][i], res["naive"][i]
                err[f"cross_entropy_rows {name} V={V} {what}"] = (
                    [rel_err(got, ref), F64_TOL] if dtype == torch.float64 else rule(got, ref, naive))

    # The fused linear cross-entropy, fwd+bwd, against the float64 oracle.
    N, H, V = 64, 100, 32001
    x = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / H ** 0.5
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    for opts in (dict(), dict(label_smoothing=0.1, z_loss=1e-4, softcap=20.0)):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        with ptcore.use_backend("cpu"):
            loss = linear_cross_entropy(xs, ws, t, **opts)
        loss.backward()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = linear_cross_entropy_ref(xr, wr, t, **opts)
        ref.backward()
        xn, wn = x.float().requires_grad_(), w.float().requires_grad_()
        naive = linear_cross_entropy_ref(xn, wn, t, **opts)
        naive.backward()
        tag = "linear_cross_entropy" + (" +options" if opts else "")
        err[f"{tag} loss"] = rule(loss, ref, naive)
        err[f"{tag} grad_input"] = rule(xs.grad, xr.grad, xn.grad)
        err[f"{tag} grad_weight"] = rule(ws.grad, wr.grad, wn.grad)

    # Log-probs and entropy (stats and grad passes), against the definition in float64 (naive: in fp32).
    for opts in (dict(), dict(temperature=0.7, softcap=5.0)):
        res = {}
        for b, dt in (("ref", torch.float64), ("naive", torch.float32), ("cpu", torch.float32)):
            xs, ws = x[:40].to(dt, copy=True).requires_grad_(), w.to(dt, copy=True).requires_grad_()
            if b == "cpu":
                with ptcore.use_backend("cpu"):
                    lp, ent = linear_logprobs(xs, ws, t[:40], return_entropy=True, **opts)
            else:
                lp, ent = naive_logprobs(xs, ws, t[:40], **opts)
            g = torch.Generator().manual_seed(3)
            g1, g2 = torch.randn(lp.shape, generator=g).to(dt), torch.randn(ent.shape, generator=g).to(dt)  # same draws
            ((lp * g1).sum() + (ent * g2).sum()).backward()
            res[b] = (lp, ent, xs.grad, ws.grad)
        tag = "linear_logprobs" + (" +T,softcap" if opts else "")
        for i, what in enumerate(("logp", "entropy", "grad_input", "grad_weight")):
            err[f"{tag} {what}"] = rule(res["cpu"][i], res["ref"][i], res["naive"][i])

    # Paged attention, decode and extend (tree mask, softcap), against the torch backend.
    S, Hkv, G, D = 16, 2, 4, 64
    lens = [1, 16, 33, 70, 300]
    q_lens = [1, 5, 16, 3, 9]
    pages = sum((L + S - 1) // S for L in lens) + 3
    perm = torch.randperm(pages).tolist()
    table = torch.full((len(lens), 300 // S + 2), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        for i in range((L + S - 1) // S):
            table[b, i] = perm.pop()
    k = torch.randn(pages, S, Hkv, D)
    v = torch.randn(pages, S, Hkv, D)
    seq = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    mask = torch.rand(sum(q_lens), max(q_lens)) < 0.5
    for b, n in enumerate(q_lens):
        mask[cu[b] + torch.arange(n), torch.arange(n)] = True
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        kd, vd = k.to(dtype), v.to(dtype)
        qd = torch.randn(len(lens), Hkv * G, D).to(dtype)
        qe = torch.randn(sum(q_lens), Hkv * G, D).to(dtype)
        with ptcore.use_backend("cpu"):
            got = (paged_attention_decode(qd, kd, vd, table, seq),
                   paged_attention_decode(qd, kd, vd, table, seq, softcap=30.0),
                   paged_attention_extend(qe, kd, vd, table, seq, cu),
                   paged_attention_extend(qe, kd, vd, table, seq, cu, tree_mask=mask, softcap=30.0))
        # the position-by-position oracle of test_paged_attention, in float64 and (naive) in dtype;
        # decode is extend with one query per sequence
        cu_d = torch.arange(len(lens) + 1, dtype=torch.int32)
        cases = ((qd, cu_d, {}), (qd, cu_d, dict(softcap=30.0)), (qe, cu, {}), (qe, cu, dict(tree_mask=mask, softcap=30.0)))
        for what, att, (qq, cc, kw) in zip(("decode", "decode softcap", "extend", "extend tree+softcap"), got, cases):
            ref, naive = (oracle(qq, kd, vd, table, seq, cc, dtype=dt, **kw) for dt in (torch.float64, dtype))
            err[f"paged_attention {name} {what}"] = rule(att, ref, naive)

    # Speculative verification: the same tokens as the torch reference, bit for bit.
    B, K, V = 9, 4, 301
    p = torch.softmax(torch.randn(B, K + 1, V) * 2, -1)
    q = torch.softmax(torch.randn(B, K, V) * 2, -1)
    xt = torch.stack([torch.multinomial(q[i], 1).squeeze(1) for i in range(B)])
    lens_d = torch.tensor([4, 3, 0, 4, 1, 2, 4, 4, 3])
    for dq, greedy in ((q, False), (None, False), (q, True)):
        res = {}
        for b in ("torch", "cpu"):
            with ptcore.use_backend(b):
                res[b] = speculative_verify(xt, dq, p, draft_lens=lens_d, greedy=greedy,
                                            generator=torch.Generator().manual_seed(7))
        exact[f"speculative_verify draft_probs={dq is not None} greedy={greedy}"] = all(
            torch.equal(a, c) for a, c in zip(res["cpu"], res["torch"]))
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])
    pt = torch.softmax(torch.randn(B, 8, V) * 2, -1)
    qt = torch.softmax(torch.randn(B, 8, V) * 2, -1)
    xtree = torch.randint(0, V, (B, 7))
    for greedy in (False, True):
        res = {}
        for b in ("torch", "cpu"):
            with ptcore.use_backend(b):
                res[b] = speculative_verify_tree(xtree, parents, qt, pt, greedy=greedy,
                                                 generator=torch.Generator().manual_seed(9))
        exact[f"speculative_verify_tree greedy={greedy}"] = all(
            torch.equal(a, c) for a, c in zip(res["cpu"], res["torch"]))
    print("RESULT " + json.dumps(out))


def _variants_here():
    """[(isa, None or why it cannot run here)] for the three levels."""
    C = _base()
    levels = C.cpu_isa_levels()
    out = []
    for isa in ISAS:
        if importlib.util.find_spec(MODULE[isa]) is None:
            out.append((isa, f"{MODULE[isa]} is not built"))
        elif not levels.get(isa):
            out.append((isa, f"this CPU cannot run x86-64-{isa} (a subprocess forcing it would die with SIGILL)"))
        else:
            out.append((isa, None))
    return out


@pytest.mark.parametrize("isa", ISAS)
def test_variant_within_the_rule_of_a_float64_oracle(isa):
    why = dict(_variants_here())[isa]
    if why:
        pytest.skip(why)
    # the caller's thread count if set (the bounds are measured at it), else 2 threads
    p = _python("from tests.test_cpu_dispatch import _worker; _worker()", PTCORE_CPU_ISA=isa,
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(next(ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT "))[7:])
    assert res["variant"]["isa"] == isa and res["variant"]["module"] == MODULE[isa], res["variant"]
    assert Path(res["module_file"]).name.startswith(MODULE[isa].split(".")[1] + "."), res["module_file"]
    worst = max(res["err"].items(), key=lambda kv: kv[1][0] / kv[1][1])
    print(f"{isa} ({res['module_file']}): {len(res['err'])} comparisons, worst {worst[0]}: {worst[1][0]:.2e} "
          f"(bound {worst[1][1]:.2e}); {len(res['exact'])} exact token checks")
    bad = {k: (e, b) for k, (e, b) in res["err"].items() if not e <= b}
    assert not bad, bad
    assert all(res["exact"].values()), res["exact"]


# ---------------------------------------------------------------------------------------------
# The choice and its errors


def test_auto_choice_is_the_best_level_the_cpu_runs():
    C = _base()
    levels = C.cpu_isa_levels()
    runnable = [isa for isa, why in _variants_here() if why is None]
    p = _python("from ptcore import _ext; import json; m = _ext.cpu_module(); "
                "print(json.dumps([_ext.cpu_variant(), m.__name__, _ext.cpu_variant_text()]))")
    assert p.returncode == 0, p.stderr
    choice, name, text = json.loads(p.stdout.splitlines()[-1])
    assert choice["isa"] == runnable[-1] and choice["forced"] is None
    assert choice["supported"] == [v for v in ISAS if levels[v]]
    assert text.startswith(f"{runnable[-1]} = {MODULE[runnable[-1]]}")
    print("auto:", text)


def test_forcing_an_unknown_or_unsupported_variant_raises():
    _base()
    p = _python("from ptcore import _ext; _ext.cpu_module()", PTCORE_CPU_ISA="v9")
    assert p.returncode != 0 and "PTCORE_CPU_ISA must be one of v2, v3, v4" in p.stderr
    # A CPU without AVX-512 (the CPUID answer stubbed, in the subprocess only): forcing v4 is refused
    # naming the missing features, and the automatic choice is v3, saying why.
    stub = ("import ptcore._C as C\n"
            "levels, feats = C.cpu_isa_levels(), C.cpu_features()\n"
            "C.cpu_isa_levels = lambda: {**levels, 'v4': False}\n"
            "C.cpu_features = lambda: {**feats, 'avx512bw': False, 'avx512vl': False}\n"
            "from ptcore import _ext\n")
    p = _python(stub + "_ext.cpu_module()", PTCORE_CPU_ISA="v4")
    assert p.returncode != 0
    msg = p.stderr.strip().splitlines()[-1]
    assert "CpuIsaError" in msg and "PTCORE_CPU_ISA=v4" in msg and "avx512bw, avx512vl" in msg and "SIGILL" in msg, msg
    print("refused:", msg)
    if importlib.util.find_spec(MODULE["v3"]) is not None:
        p = _python(stub + "print(_ext.cpu_variant_text())")
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("v3 = ptcore._C_v3") and "lacks x86-64-v4" in p.stdout, p.stdout
    # ptcore info prints the error instead of a traceback.
    p = subprocess.run([sys.executable, "-m", "ptcore", "info"], cwd=ROOT, env=_env(PTCORE_CPU_ISA="v9"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "PTCORE_CPU_ISA must be one of" in p.stderr and "Traceback" not in p.stderr


def test_ptcore_info_names_the_variant():
    _base()
    p = subprocess.run([sys.executable, "-m", "ptcore", "info"], cwd=ROOT, env=_env(PTCORE_CPU_ISA="v2"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("cpu kernels:"))
    assert "v2 = ptcore._C" in line and "forced by PTCORE_CPU_ISA=v2" in line, line


# ---------------------------------------------------------------------------------------------
# What the shared objects hold


def _so(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.skip(f"{module} is not built")
    return Path(spec.origin)


def _objdump(*args) -> str:
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed: cannot inspect the instructions")
    p = subprocess.run(["objdump", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _vector_use(so: Path) -> dict:
    """Counts of VEX/EVEX-encoded instructions (mnemonics v*: AVX and later) and of ymm / zmm /
    AVX-512 mask registers in the disassembly."""
    import re
    text = _objdump("-d", "--no-show-raw-insn", str(so))
    insns = re.findall(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$", text, flags=re.M)
    return {"vex": sum(1 for m, _ in insns if m.startswith("v")),
            "ymm": sum(1 for _, ops in insns if "%ymm" in ops),
            "zmm": sum(1 for _, ops in insns if "%zmm" in ops),
            "kmask": sum(1 for _, ops in insns if re.search(r"%k[0-7]\b", ops)),
            "insns": len(insns)}


def test_baseline_module_has_no_avx_instructions():
    """ptcore._C runs on any x86-64-v2 CPU: no AVX / AVX2 / AVX-512 instruction anywhere in it
    (the hot kernels' faster copies live in _C_v3 / _C_v4 only)."""
    _base()
    use = {m: _vector_use(_so(MODULE[m])) for m in ISAS if importlib.util.find_spec(MODULE[m])}
    print({m: {k: v for k, v in u.items()} for m, u in use.items()})
    base = use["v2"]
    assert base["insns"] > 1000
    assert base["vex"] == base["ymm"] == base["zmm"] == base["kmask"] == 0, base
    if "v3" in use:  # AVX2 but no AVX-512
        assert use["v3"]["ymm"] > 0 and use["v3"]["zmm"] == use["v3"]["kmask"] == 0, use["v3"]
    if "v4" in use:
        assert use["v4"]["zmm"] > 0, use["v4"]


def test_each_module_exports_only_its_init():
    """No symbol (std:: template instantiations included) is exported, so nothing of one ISA level
    can bind to another level's copy."""
    _base()
    if not sys.platform.startswith("linux"):
        pytest.skip("the version script is applied on Linux only")
    for isa in ISAS:
        if importlib.util.find_spec(MODULE[isa]) is None:
            continue
        so = _so(MODULE[isa])
        dyn = _objdump("-T", str(so))
        defined = [ln.split()[-1] for ln in dyn.splitlines()
                   if "*UND*" not in ln and (" DF " in ln or " DO " in ln)]
        assert defined == [f"PyInit_{MODULE[isa].split('.')[1]}"], (so.name, defined)
