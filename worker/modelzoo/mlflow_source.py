"""Models from the MLflow Model Registry (`model.mlflow: "models:/name/3"` or `"models:/name@alias"`).

The registered artifact must be a transformers model (`mlflow.transformers.log_model`): its folder
holds `MLmodel` (flavor `transformers`, the weights folder under `model_binary`, usually `model/`)
and the tokenizer under `components/tokenizer/`. An alias is resolved to its version when the job
loads the model; the version's files are downloaded once into the worker's cache
(`<cache>/mlflow/<name>/<version>`, written to a scratch folder and renamed into place) and loaded
from there with transformers. The source recorded in the result is `mlflow:models:/<name>/<version>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from app.config import Settings
from worker.stage import JobFailed

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z][A-Za-z0-9_\-]*))$")
_MARKER = "layerscope-mlflow.json"

Loader = Callable[[torch.dtype, dict[str, Any]], tuple[Any, Any, bool]]


def _client(settings: Settings) -> Any:
    if not settings.mlflow_tracking_uri:
        raise JobFailed(
            "registry_not_configured",
            "model.mlflow needs an MLflow tracking server: this worker has no LAYERSCOPE_MLFLOW_TRACKING_URI",
        )
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise JobFailed(
            "registry_unavailable", "mlflow is not installed on this worker (pip install 'layerscope[mlflow]')"
        ) from None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.mlflow_http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(settings.mlflow_timeout))))
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri or None)


def _registry_error(uri: str, exc: Exception) -> JobFailed:
    code = getattr(exc, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return JobFailed("model_not_found", f"{uri}: no such registered model, version or alias in MLflow ({exc})")
    return JobFailed(
        "registry_unavailable",
        f"{uri}: the MLflow registry could not be read ({type(exc).__name__}: {str(exc)[:300]}); "
        "check LAYERSCOPE_MLFLOW_TRACKING_URI and the credentials, and resubmit",
    )


def resolve(uri: str, settings: Settings) -> tuple[str, str]:
    """(registered name, version) of a `models:/` URI; an alias is read from the registry now."""
    match = _URI.match(uri)
    if match is None:
        raise JobFailed("model_not_found", f"{uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    name = match["name"]
    client = _client(settings)
    try:
        if match["version"]:
            return name, str(client.get_model_version(name, match["version"]).version)
        return name, str(client.get_model_version_by_alias(name, match["alias"]).version)
    except JobFailed:
        raise
    except Exception as exc:
        raise _registry_error(uri, exc) from exc


def cache_dir(name: str, version: str, settings: Settings) -> Path:
    return settings.cache_dir / "mlflow" / re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:128] / version


def download(name: str, version: str, settings: Settings) -> Path:
    """The version's files in the worker's cache (downloaded once)."""
    target = cache_dir(name, version, settings)
    if (target / _MARKER).is_file():
        return target
    uri = f"models:/{name}/{version}"
    _client(settings)  # configured and installed, or JobFailed
    import mlflow.artifacts

    scratch = target.parent / f".partial-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(scratch), tracking_uri=settings.mlflow_tracking_uri,
            registry_uri=settings.mlflow_registry_uri or None,
        )
        (scratch / _MARKER).write_text(json.dumps({"uri": uri}))
        if target.exists():
            shutil.rmtree(scratch, ignore_errors=True)  # another worker finished first
        else:
            os.replace(scratch, target)
    except Exception as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise _registry_error(uri, exc) from exc
    return target


def transformers_folders(folder: Path, uri: str) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of a downloaded transformers-flavor MLflow model."""
    mlmodel = folder / "MLmodel"
    flavor = None
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("transformers")
    if not flavor:
        raise JobFailed(
            "model_format_unsupported",
            f"{uri} is not a transformers model in MLflow (no `transformers` flavor in its MLmodel); register it "
            "with mlflow.transformers.log_model",
        )
    weights = folder / str(flavor.get("model_binary") or "model")
    if not (weights / "config.json").is_file():
        raise JobFailed(
            "model_format_unsupported",
            f"{uri}: the transformers flavor has no saved weights (a model logged by reference, "
            "save_pretrained=False, is not supported); log it with its weights",
        )
    tokenizer = folder / "components" / "tokenizer"
    return weights, tokenizer if tokenizer.is_dir() else weights


def plan(uri: str, trust_remote_code: bool, settings: Settings) -> tuple[str, Loader]:
    """(source, loader) for `load_model`: the version is resolved now, the files fetched when loading."""
    from worker.modelzoo import loading

    name, version = resolve(uri, settings)
    pinned = f"models:/{name}/{version}"

    def load(dtype: torch.dtype, extra: dict[str, Any]) -> tuple[Any, Any, bool]:
        import transformers

        weights, tok = transformers_folders(download(name, version, settings), pinned)
        loading.check_safetensors(weights, pinned)
        with loading._load_errors(pinned, False):
            config = transformers.AutoConfig.from_pretrained(str(weights), trust_remote_code=trust_remote_code)
            causal = loading._is_causal(config)
            cls = transformers.AutoModelForCausalLM if causal else loading._encoder_class(config)
            model = cls.from_pretrained(str(weights), dtype=dtype, trust_remote_code=trust_remote_code, **extra)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok), trust_remote_code=trust_remote_code)
        return model, tokenizer, causal

    return f"mlflow:{pinned}", load
