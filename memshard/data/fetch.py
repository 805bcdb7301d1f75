"""Set-up-time downloads of the built-in data sets that do not ship in a wheel.

Nothing in memshard may download at run time (training, preparing, evaluating): a run
must behave the same with or without a network, and a CI job must not depend on a
registry being up in the middle of a test. Data that is not inside an installed package
is therefore fetched once, by ``bash scripts/setup.sh`` or
``python -m memshard.data.fetch emoji``, into a local cache; the run-time code only
looks it up (``emoji_dir``) and fails with a message that says how to fetch it.

The emoji set is the npm package ``emoji-datasource-google`` at a pinned version, checked
against the registry's pinned sha512 ``integrity`` before anything is extracted, so a
changed or corrupted tarball can never silently change a benchmark's training data.
Only ``package/emoji.json`` and the 64x64 PNGs are kept (the tarball also holds larger
sizes and sprite sheets that memshard never reads); ``package/`` is stripped, so the
cache holds ``emoji.json`` and ``img/google/64/*.png``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from memshard.data.dataset import DataError

EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_VERSION = "16.0.0"
EMOJI_URL = f"https://registry.npmjs.org/{EMOJI_PACKAGE}/-/{EMOJI_PACKAGE}-{EMOJI_VERSION}.tgz"
# `npm view emoji-datasource-google@16.0.0 dist.integrity`
EMOJI_INTEGRITY = "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="
EMOJI_IMAGE_DIR = "img/google/64"  # inside the extracted directory
_KEEP_JSON = "package/emoji.json"
_KEEP_IMAGE = re.compile(r"^package/img/google/64/([A-Za-z0-9_.-]+\.png)$")
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A set-up download that failed (network, integrity, or a tarball without the expected files)."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The download cache: ``cache_dir``, else ``$MEMSHARD_CACHE``, else ``~/.cache/memshard``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEMSHARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memshard"


def _emoji_target(cache_dir: str | os.PathLike[str] | None) -> Path:
    return cache_root(cache_dir) / f"{EMOJI_PACKAGE}-{EMOJI_VERSION}"


def _is_complete(path: Path) -> bool:
    # The directory only ever appears by an atomic rename of a finished extraction, so
    # these two checks are enough to tell a usable cache from an absent one.
    return (path / "emoji.json").is_file() and (path / EMOJI_IMAGE_DIR).is_dir()


def emoji_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The extracted emoji directory (``emoji.json``, ``img/google/64/``); DataError if it was never fetched."""
    path = _emoji_target(cache_dir)
    if not _is_complete(path):
        raise DataError(
            f"emoji: {path} not found; the emoji images are fetched at set-up time, not at run time: "
            "run `bash scripts/setup.sh` or `python -m memshard.data.fetch emoji` "
            "(set MEMSHARD_CACHE to use another cache directory)"
        )
    return path


def _integrity_of(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return f"{algorithm}-{base64.b64encode(digest.digest()).decode('ascii')}"


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
            shutil.copyfileobj(resp, out, _CHUNK)
    except OSError as exc:  # URLError, HTTPError, timeouts and disk errors are all OSError
        raise FetchError(f"cannot download {url} ({exc})") from exc


def _extract(tarball: Path, dest: Path, url: str) -> int:
    """Copy emoji.json and the 64px PNGs out of ``tarball`` into ``dest``; returns the number of images.

    Members are read with ``extractfile`` and written under names this code builds, so a
    crafted tarball cannot write outside ``dest`` (no links, no ``..``, no absolute paths).
    """
    images = dest / EMOJI_IMAGE_DIR
    images.mkdir(parents=True)
    found_json, count = False, 0
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == _KEEP_JSON:
                    target, found_json = dest / "emoji.json", True
                elif m := _KEEP_IMAGE.match(member.name):
                    target, count = images / m.group(1), count + 1
                else:
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FetchError(f"{url}: cannot extract the tarball ({exc})") from exc
    if not found_json or count == 0:
        raise FetchError(f"{url}: tarball has no {_KEEP_JSON} or no 64px google images")
    return count


def fetch_emoji(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    url: str = EMOJI_URL,
    integrity: str = EMOJI_INTEGRITY,
    timeout: float = 300.0,
) -> Path:
    """Download, verify and extract the pinned emoji package once; returns its directory.

    Idempotent and safe to run concurrently: an existing extraction is returned without
    touching the network, and a new one is built in a temporary directory next to the
    target and renamed into place, so a crash or a parallel fetch never leaves a
    half-extracted directory that ``emoji_dir`` would accept. ``url`` and ``integrity``
    exist for mirrors and tests; the defaults are the pinned registry tarball.
    """
    target = _emoji_target(cache_dir)
    if _is_complete(target):
        return target
    algorithm, sep, _ = integrity.partition("-")
    if not sep or algorithm not in hashlib.algorithms_available:
        raise ValueError(f"integrity must look like 'sha512-<base64>', got {integrity!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tarball = work / "package.tgz"
        _download(url, tarball, timeout)
        got = _integrity_of(tarball, algorithm)
        if got != integrity:
            raise FetchError(f"{url}: integrity mismatch (expected {integrity}, got {got}); refusing to use it")
        staged = work / "extracted"
        _extract(tarball, staged, url)
        try:
            staged.rename(target)
        except OSError:
            # Another process finished first: its copy is just as good (same verified tarball).
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memshard.data.fetch", description="set-up-time downloads of built-in data sets"
    )
    parser.add_argument("what", choices=("emoji",), help="what to fetch")
    parser.add_argument("--cache-dir", help="cache directory (default: $MEMSHARD_CACHE or ~/.cache/memshard)")
    args = parser.parse_args(argv)
    try:
        path = fetch_emoji(args.cache_dir)
    except (FetchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"emoji: {len(list((path / EMOJI_IMAGE_DIR).glob('*.png')))} images in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
