"""One storage layer for run directories, datasets and checkpoints: local paths or s3://.

Built on fsspec (s3fs for ``s3://``). The one rule every writer follows: data first,
manifest last. ``write_bytes`` is atomic from a reader's point of view on both backends
(local: write a temp file then ``os.replace``; S3: a PUT is all-or-nothing), so a reader
that trusts only the manifest never sees a half-written round.

S3 endpoint, region and credentials come from the environment (AWS_* variables and
``MEMSHARD_S3_ENDPOINT_URL``) or from the config's ``storage`` section, config first. They
reach Ray workers as an :class:`S3Access` argument that each actor or task installs into its
own process (:func:`install_access`), not through the job's runtime env: Ray's runtime-env
agent logs every serialized runtime env at INFO level (``runtime_env_agent.log``) and the
dashboard shows it, so secrets placed there would be written to disk in clear. Only the
non-secret endpoint and region would be safe there; the object-store path carries both.
Secrets never enter a config dump, a manifest, ``repr`` or a log line.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


# Environment variable of each S3 setting; the first name is the one memshard sets.
S3_ENV: dict[str, tuple[str, ...]] = {
    "endpoint_url": ("MEMSHARD_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "profile": ("AWS_PROFILE",),
}


@dataclass(frozen=True)
class S3Access:
    """Where S3 is and who we are there; secrets are left out of ``repr`` (and so of logs)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, storage_cfg: Any = None) -> S3Access:
        """Config values (``storage.*``; secrets as pydantic ``SecretStr``) over the environment."""
        values: dict[str, str | None] = {}
        for name, env_names in S3_ENV.items():
            value = getattr(storage_cfg, name, None) if storage_cfg is not None else None
            if value is not None and hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            if value is None:
                value = next((os.environ[e] for e in env_names if os.environ.get(e)), None)
            values[name] = value or None
        return cls(**values)

    def env(self) -> dict[str, str]:
        """The environment variables that carry these settings (secrets included: never log this)."""
        return {S3_ENV[f.name][0]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def __bool__(self) -> bool:
        return bool(self.env())


def install_access(access: S3Access | None) -> None:
    """Make ``access`` this process's S3 settings (a Ray worker's first act when given one)."""
    if access:
        os.environ.update(access.env())


@contextmanager
def access_installed(access: S3Access | None) -> Iterator[None]:
    """``install_access`` for the duration of a block, then the environment as it was (the driver)."""
    if not access:
        yield
        return
    saved = {k: os.environ.get(k) for k in access.env()}
    install_access(access)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_options() -> dict[str, Any]:
    """s3fs options from this process's environment (see :class:`S3Access`).

    Credentials are passed explicitly, not left to botocore's lookup, so fsspec's instance
    cache (keyed by these options) never hands out a filesystem built with other credentials.
    Listings are not cached: several processes (driver, coordinator, shard actors) write the
    same run directory, and a listing cached in one would hide or invent another's files.
    """
    access = S3Access.resolve()
    opts: dict[str, Any] = {"use_listings_cache": False}
    client: dict[str, Any] = {}
    if access.endpoint_url:
        client["endpoint_url"] = access.endpoint_url
    if access.region:
        client["region_name"] = access.region
    if client:
        opts["client_kwargs"] = client
    if access.access_key_id and access.secret_access_key:
        opts["key"], opts["secret"] = access.access_key_id, access.secret_access_key
        if access.session_token:
            opts["token"] = access.session_token
    elif access.profile:
        opts["profile"] = access.profile
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a URI."""
    if uri.startswith("s3://"):
        fs = fsspec.filesystem("s3", **s3_options())
        return fs, uri[len("s3://") :]
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return fsspec.filesystem("file"), str(Path(uri).expanduser().absolute())


class Storage:
    """A directory (local or remote) with atomic writes and safe joins."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") if uri != "/" else uri
        self.fs, self.root = filesystem(self.uri)
        self.local = not is_remote(self.uri)

    # -- paths ---------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Absolute path of ``rel`` inside this storage; refuses anything escaping the root."""
        if not rel:
            return self.root
        norm = posixpath.normpath(rel)
        if norm.startswith("/") or norm == ".." or norm.startswith("../"):
            raise ValueError(f"path {rel!r} escapes the run directory")
        return posixpath.join(self.root, norm)

    def uri_of(self, rel: str) -> str:
        if self.local:
            return self.path(rel)
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{self.path(rel)}"

    def child(self, rel: str) -> Storage:
        return Storage(self.uri_of(rel))

    # -- queries -------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    # -- reads ---------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    # -- writes --------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a reader sees the old content or the new, never a prefix."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            self.fs.pipe_file(target, data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Copy a local directory tree to ``rel`` (replacing what was there)."""
        self.remove(rel)
        for root, _dirs, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(root, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as fh:
                    self.write_bytes(posixpath.join(rel, sub), fh.read())

    @contextmanager
    def local_copy(self, rel: str) -> Iterator[str]:
        """A local directory holding ``rel`` (the directory itself when local)."""
        if self.local:
            yield self.path(rel)
            return
        tmp = tempfile.mkdtemp(prefix="memshard-")
        try:
            self.fs.get(self.path(rel).rstrip("/") + "/", tmp + "/", recursive=True)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def open_input(self, rel: str) -> io.BufferedIOBase:
        return self.fs.open(self.path(rel), "rb")
