"""Every seeding rule of memshard in one place, so that a run, a redo and a server agree bit for bit.

* :func:`round_seed`: the generators of proxy ``shard`` in round ``r`` of a run with seed ``s``
  (batch order, timesteps, noise, dropout, augmentation); the coordinator's own stream is shard -1.
  A hash, not ``s + r``: streams of neighbouring runs, rounds and shards never overlap, and a
  round redone after a crash draws exactly what it drew the first time.
* :func:`image_seeds`: the noise of generated image ``i`` of a request (or evaluation) with seed
  ``s``: ``s * IMAGE_SEED_STRIDE + i``. ``memshard sample``, ``memshard evaluate`` and the server
  use it, so the same seed and index give the same image whichever produced it and however the
  images were split over workers or batched with other requests.
"""

from __future__ import annotations

import hashlib

IMAGE_SEED_STRIDE = 1_000_003  # a prime larger than any batch: seeds of different requests never collide


def round_seed(seed: int, round_id: int, shard_id: int) -> int:
    """A 63-bit seed unique to (run seed, round, shard), stable across processes."""
    digest = hashlib.sha256(f"memshard:{seed}:{round_id}:{shard_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_seeds(seed: int, n: int, offset: int = 0) -> list[int]:
    """Noise seeds of images ``offset .. offset + n - 1`` of a request or evaluation with ``seed``."""
    base = seed * IMAGE_SEED_STRIDE + offset
    return [base + i for i in range(n)]
