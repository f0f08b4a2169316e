"""Where large artifacts live (files over `INLINE_BYTES`; smaller ones stay in their row).

Every worker writes and every API replica and worker reads the same store, so a mitigation
patch written on one GPU machine is downloaded from another and applied on a third:

- `LAYERSCOPE_ARTIFACT_STORE` unset: `<data_dir>/artifacts`, right for one machine;
- a directory path (or `file:///path`): a shared filesystem mounted at the same path on
  every machine (NFS, a compose volume);
- `s3://bucket/prefix`: an S3-compatible object store through boto3. Credentials and region
  come from boto3's usual chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, a profile, an
  instance role); `LAYERSCOPE_ARTIFACT_S3_ENDPOINT_URL` points it at MinIO, Ceph or another
  S3-compatible server.

An artifact's row records its key (`<analysis id>/<name>`), not where the store is, so keys
stay valid when a deployment moves from a local folder to a shared one (copy the files).
No torch here: the API process uses this module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.config import Settings

INLINE_BYTES = 16 * 1024 * 1024  # up to this many bytes an artifact is kept in its database row
CHUNK = 1024 * 1024


class StoreError(Exception):
    """The store could not be reached or refused the request (logged; the caller decides)."""


class ArtifactStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def chunks(self, key: str) -> Iterator[bytes] | None: ...
    def local_path(self, key: str) -> Path | None: ...
    def delete(self, key: str) -> None: ...


def artifact_key(analysis_id: str, name: str) -> str:
    return f"{analysis_id}/{name}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"not an artifact key: {key!r}")
    return key


class LocalStore:
    """A directory: the data dir's own, or a shared filesystem's mount point."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path | None:
        """The file for `key`; None when it is gone or the key would lead outside the root."""
        root = self.root.resolve()
        path = (root / key).resolve()
        return path if path.is_file() and root in path.parents else None

    def put(self, key: str, data: bytes) -> None:
        dest = self.root / _check_key(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)  # atomic: a reader on another machine never sees half a file

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return None if path is None else path.read_bytes()

    def chunks(self, key: str) -> Iterator[bytes] | None:
        path = self._path(key)
        if path is None:
            return None

        def read() -> Iterator[bytes]:
            with path.open("rb") as f:
                while block := f.read(CHUNK):
                    yield block

        return read()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            path.unlink(missing_ok=True)


class S3Store:
    """A bucket (and key prefix) of an S3-compatible object store, through boto3."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client: Any = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3  # only where an S3 store is configured
            from botocore.config import Config

            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise StoreError(f"writing s3://{self.bucket}/{self._key(key)} failed: {exc}") from exc

    def _body(self, key: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StoreError(f"reading s3://{self.bucket}/{self._key(key)} failed: {exc}") from exc
        except Exception as exc:  # unreachable endpoint, bad credentials, ...
            raise StoreError(f"reading s3://{self.bucket}/{self._key(key)} failed: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        body = self._body(key)
        return None if body is None else bytes(body.read())

    def chunks(self, key: str) -> Iterator[bytes] | None:
        body = self._body(key)
        return None if body is None else body.iter_chunks(CHUNK)

    def local_path(self, key: str) -> Path | None:
        return None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise StoreError(f"deleting s3://{self.bucket}/{self._key(key)} failed: {exc}") from exc


def parse_store(url: str | None, default_root: Path, endpoint_url: str | None = None) -> ArtifactStore:
    """The store a `LAYERSCOPE_ARTIFACT_STORE` value names (see module doc)."""
    if not url:
        return LocalStore(default_root)
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"artifact store {url!r}: an S3 URL needs a bucket (s3://bucket/prefix)")
        return S3Store(bucket, prefix, endpoint_url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        raise ValueError(f"artifact store {url!r}: use a directory path, file:///path or s3://bucket/prefix")
    return LocalStore(Path(url))


_stores: dict[tuple[str | None, str, str | None], ArtifactStore] = {}
_lock = threading.Lock()


def store_for(settings: Settings) -> ArtifactStore:
    """The configured store, one per process and configuration (boto3 clients are reused)."""
    key = (settings.artifact_store, str(settings.artifacts_dir), settings.artifact_s3_endpoint_url)
    with _lock:
        if key not in _stores:
            _stores[key] = parse_store(settings.artifact_store, settings.artifacts_dir,
                                       settings.artifact_s3_endpoint_url)
        return _stores[key]
