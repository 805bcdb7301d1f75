"""One storage layer for run directories, datasets and checkpoints: local paths or s3://.

Built on fsspec (s3fs for ``s3://``). The one rule every writer follows: data first,
manifest last. ``write_bytes`` is atomic from a reader's point of view on both backends
(local: write a temp file then ``os.replace``; S3: a PUT is all-or-nothing), so a reader
that trusts only the manifest never sees a half-written round.

S3 endpoint, region and credentials come from the environment (AWS_* variables and
``MEMSHARD_S3_ENDPOINT_URL``) so they never enter a config, a manifest or a log line.
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
from pathlib import Path
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_options() -> dict[str, Any]:
    """s3fs options from the environment (never from config files)."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("MEMSHARD_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    client: dict[str, Any] = {}
    if endpoint:
        client["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
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
