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

Storage faults. Every remote operation of :class:`Storage` is retried on *transient* errors
only: connection refused/reset/closed, timeouts, HTTP 5xx, 429 and S3's throttling codes
(``SlowDown``, ``Throttling``, ``RequestTimeout``, ``InternalError``, ``ServiceUnavailable``...),
whether they surface as botocore / aiohttp exceptions, as Python's ``ConnectionError`` /
``TimeoutError``, or as the ``OSError`` s3fs translates them to (its cause is inspected).
Missing objects, refused access, bad arguments (``FileNotFoundError``, ``PermissionError``,
``ValueError``...) fail at once: waiting does not change them. The policy
(:class:`RetryPolicy`): ``RETRY_ATTEMPTS`` = 10 attempts, sleeping ``BACKOFF_BASE`` = 0.5 s
doubled after each failure up to ``BACKOFF_MAX`` = 30 s (plus up to 25 % random jitter, so
shard actors hitting the same outage do not retry in lockstep): 0.5+1+2+4+8+16+30+30+30 s,
about two minutes of waiting, so an S3 restart, a failover or a burst of throttling of up
to ~2 minutes is ridden out, and a real outage is reported within ~2.5 minutes instead of
hanging a round. The environment overrides each default (``MEMSHARD_STORAGE_RETRIES``,
``MEMSHARD_STORAGE_BACKOFF``, ``MEMSHARD_STORAGE_BACKOFF_MAX``; read at each operation, so
a Ray worker follows its own environment). botocore's and s3fs's own retries (a few
seconds; ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``) still run inside each attempt. Every
retried operation is idempotent (whole-object PUT, GET, HEAD, LIST, recursive delete, a
download into a fresh temporary directory), and retrying a PUT keeps it atomic: the object
is the old one until one attempt succeeds. When the attempts are spent the operation
raises :class:`StorageError` naming the operation, the URI, the attempts and the last
error (never credentials).

Local files are not retried (a local error does not go away by waiting), but a full disk
(``ENOSPC``/``EDQUOT``) raises :class:`StorageError` saying the disk is full, with the path,
and refused access (``EACCES``/``EPERM``/``EROFS``) raises :class:`StoragePermissionError`
(a ``PermissionError``) naming the path and whether it is not writable or not readable.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")


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


# --------------------------------------------------------------------------- faults
RETRY_ATTEMPTS = 10
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
RETRY_ENV = {
    "attempts": "MEMSHARD_STORAGE_RETRIES",
    "base": "MEMSHARD_STORAGE_BACKOFF",
    "max_delay": "MEMSHARD_STORAGE_BACKOFF_MAX",
}


class StorageError(OSError):
    """A storage operation that failed with a message saying what, where and why.

    ``op`` and ``uri`` name the operation and the object; ``attempts`` is how many were made
    (1 for errors that are not retried). ``errno`` is set where one applies (``ENOSPC``...).
    """

    def __init__(
        self, message: str, *, op: str = "", uri: str = "", attempts: int = 1, code: int | None = None
    ) -> None:
        super().__init__(message)
        self.op, self.uri, self.attempts = op, uri, attempts
        if code is not None:
            self.errno = code
            self.filename = uri or None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:  # errno is not in __dict__: keep it across pickling (Ray)
        return _rebuild_storage_error, (type(self), str(self), self.op, self.uri, self.attempts, self.errno)


def _rebuild_storage_error(
    cls: type[StorageError], message: str, op: str, uri: str, attempts: int, code: int | None
) -> StorageError:
    return cls(message, op=op, uri=uri, attempts=attempts, code=code)


class StoragePermissionError(StorageError, PermissionError):
    """Access refused: a path that is not writable / readable, or an S3 access denial."""


@dataclass(frozen=True)
class RetryPolicy:
    """How transient remote errors are retried (see the module docstring for the choice)."""

    attempts: int = RETRY_ATTEMPTS
    base: float = BACKOFF_BASE
    max_delay: float = BACKOFF_MAX
    jitter: float = 0.25

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The module defaults, each overridden by its environment variable when set."""
        values: dict[str, Any] = {}
        for name, env in RETRY_ENV.items():
            raw = os.environ.get(env, "").strip()
            if not raw:
                continue
            try:
                values[name] = int(raw) if name == "attempts" else float(raw)
            except ValueError:
                raise ValueError(f"{env}={raw!r} is not a number") from None
        policy = cls(**{"attempts": RETRY_ATTEMPTS, "base": BACKOFF_BASE, "max_delay": BACKOFF_MAX, **values})
        if policy.attempts < 1 or policy.base < 0 or policy.max_delay < 0:
            raise ValueError(
                f"bad storage retry policy {policy} (from {', '.join(RETRY_ENV.values())}): "
                "attempts must be >= 1 and delays >= 0"
            )
        return policy

    def delay(self, failures: int) -> float:
        """Seconds to sleep after the ``failures``-th consecutive failure (1-based)."""
        d = min(self.max_delay, self.base * 2 ** (failures - 1))
        return d * (1 + self.jitter * random.random())


# S3 error codes (and HTTP statuses) worth waiting out.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "500",
        "502",
        "503",
        "504",
        "429",
    }
)
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs's translation of SlowDown / ServiceUnavailable / 503
        getattr(errno, "EREMOTEIO", 121),  # s3fs's translation of InternalError / 500
    }
)
# Never retried: waiting does not make a missing object appear or a refusal go away.
PERMANENT = (
    StorageError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
    NotImplementedError,
)


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore import exceptions as bx

        types += [bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError]
        from botocore.parsers import ResponseParserError

        types.append(ResponseParserError)  # throttling responses with invalid XML (s3fs#484)
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES: tuple[type[BaseException], ...] | None = None


def _response_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of a botocore ``ClientError`` / aiohttp response error."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        return (str(err["Code"]) if err.get("Code") is not None else None), (int(status) if status else None)
    status = getattr(exc, "status", None)
    return None, (status if isinstance(status, int) else None)


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and retrying may make ``exc`` go away (see the module docstring)."""
    global _TRANSIENT_TYPES
    if _TRANSIENT_TYPES is None:
        _TRANSIENT_TYPES = _transient_types()
    if isinstance(exc, PERMANENT):
        return False
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if link is not exc and isinstance(link, PERMANENT):
            return False
        if isinstance(link, _TRANSIENT_TYPES):
            return True
        code, status = _response_code(link)
        if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if isinstance(link, OSError) and link.errno in TRANSIENT_ERRNOS:
            return True
        link = link.__cause__ or link.__context__
    return False


def _redact(text: str) -> str:
    """``text`` without this process's S3 secrets or any ``user:password@`` in a URL."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    access = S3Access.resolve()
    for secret in (access.secret_access_key, access.session_token, access.access_key_id):
        if secret:
            text = text.replace(secret, "***")
    return text


def _describe(exc: BaseException) -> str:
    return _redact(f"{type(exc).__name__}: {exc}")


def _local_error(exc: OSError, op: str, target: str, *, write: bool) -> OSError:
    """A clear error for a failed local file operation (disk full, not writable / readable)."""
    where = exc.filename if isinstance(exc.filename, str) else target
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", 122)):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        free = ""
        try:
            free = f", {shutil.disk_usage(os.path.dirname(target) or '.').free} bytes free"
        except OSError:
            pass
        err: OSError = StorageError(
            f"cannot {op} {target}: the disk is full ({what} writing {where}{free}); "
            "free some space or put the run directory on a larger disk",
            op=op,
            uri=target,
            code=exc.errno,
        )
    elif isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        if exc.errno == errno.EROFS:
            why = f"{where} is on a read-only file system"
        else:
            why = f"{where} is not {'writable' if write else 'readable'} by this process (uid {os.getuid()})"
        err = StoragePermissionError(
            f"cannot {op} {target}: permission denied: {why}; check the owner and mode of the directory",
            op=op,
            uri=target,
            code=exc.errno if exc.errno is not None else errno.EACCES,
        )
    else:
        return exc
    err.__cause__ = exc
    return err


class Storage:
    """A directory (local or remote) with atomic writes and safe joins.

    Remote operations retry transient errors under ``retry`` (default: :meth:`RetryPolicy.from_env`
    at each operation); see the module docstring.
    """

    def __init__(self, uri: str, retry: RetryPolicy | None = None) -> None:
        self.uri = uri.rstrip("/") if uri != "/" else uri
        self.fs, self.root = filesystem(self.uri)
        self.local = not is_remote(self.uri)
        self.retry = retry

    # -- faults --------------------------------------------------------------------
    def _call(self, op: str, rel: str, fn: Callable[[], T], *, write: bool = False) -> T:
        """Run ``fn``: remote, retrying transient errors; local, with clear disk-full / permission errors."""
        target = self.uri_of(rel)
        if self.local:
            try:
                return fn()
            except OSError as exc:
                err = _local_error(exc, op, target, write=write)
                if err is exc:
                    raise
                raise err from exc
        policy = self.retry or RetryPolicy.from_env()
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if isinstance(exc, PermissionError) and not isinstance(exc, StorageError):
                    raise StoragePermissionError(
                        f"cannot {op} {target}: access denied ({_describe(exc)}); "
                        "check the credentials and the bucket's policy",
                        op=op,
                        uri=target,
                        code=errno.EACCES,
                    ) from exc
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", 122)):
                    raise _local_error(exc, op, target, write=True) from exc  # a local temp dir filled up
                if not is_transient(exc):
                    raise
                if attempt == policy.attempts:
                    raise StorageError(
                        f"cannot {op} {target}: storage unreachable or failing after {attempt} attempt(s) "
                        f"over {time.monotonic() - started:.1f} s (last error: {_describe(exc)}); "
                        f"{RETRY_ENV['attempts']} / {RETRY_ENV['max_delay']} allow longer outages",
                        op=op,
                        uri=target,
                        attempts=attempt,
                    ) from exc
                pause = policy.delay(attempt)
                log.warning(
                    "storage: %s %s failed (attempt %d/%d, %s); retrying in %.2f s",
                    op,
                    target,
                    attempt,
                    policy.attempts,
                    _describe(exc),
                    pause,
                )
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

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
        return Storage(self.uri_of(rel), retry=self.retry)

    # -- queries -------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        p = self.path(rel)
        return self._call("check", rel, lambda: self.fs.exists(p))

    def listdir(self, rel: str = "") -> list[str]:
        p = self.path(rel)

        def ls() -> list[str]:
            if not self.fs.exists(p):
                return []
            return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

        return self._call("list", rel, ls)

    # -- reads ---------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        p = self.path(rel)

        def read() -> bytes:
            with self.fs.open(p, "rb") as fh:
                return fh.read()

        return self._call("read", rel, read)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    # -- writes --------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a reader sees the old content or the new, never a prefix."""
        target = self.path(rel)
        if self.local:
            self._call("write", rel, lambda: _write_local(target, data), write=True)
        else:
            self._call("write", rel, lambda: self.fs.pipe_file(target, data), write=True)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def remove(self, rel: str) -> None:
        p = self.path(rel)

        def rm() -> None:
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

        self._call("remove", rel, rm, write=True)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            p = self.path(rel)
            self._call("create directory", rel, lambda: os.makedirs(p, exist_ok=True), write=True)

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Copy a local directory tree to ``rel`` (replacing what was there)."""
        self.remove(rel)
        for root, _dirs, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(root, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                try:
                    with open(src, "rb") as fh:
                        data = fh.read()
                except OSError as exc:
                    err = _local_error(exc, "upload", src, write=False)
                    if err is exc:
                        raise
                    raise err from exc
                self.write_bytes(posixpath.join(rel, sub), data)

    @contextmanager
    def local_copy(self, rel: str) -> Iterator[str]:
        """A local directory holding ``rel`` (the directory itself when local)."""
        if self.local:
            yield self.path(rel)
            return
        src = self.path(rel).rstrip("/") + "/"
        tmp = tempfile.mkdtemp(prefix="memshard-")
        try:

            def get() -> None:
                # each attempt starts from an empty directory (no half-downloaded leftovers)
                for name in os.listdir(tmp):
                    path = os.path.join(tmp, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                self.fs.get(src, tmp + "/", recursive=True)

            self._call("download", rel, get)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def open_input(self, rel: str) -> io.BufferedIOBase:
        """A binary file handle; opening is retried, later reads rely on s3fs's own retries."""
        p = self.path(rel)
        return self._call("open", rel, lambda: self.fs.open(p, "rb"))


def _write_local(target: str, data: bytes) -> None:
    """Atomic local write: a temp file beside ``target``, fsynced, then ``os.replace``."""
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
