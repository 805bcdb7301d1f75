"""Per-round TensorBoard curves of a run: RUN/tb/events.out.tfevents.*, global step = round id.

The driver logs one point per tag after each *committed* round (the manifest is the source
of truth; TensorBoard is a view of it). A resumed run opens a new event file in the same
directory with ``purge_step`` = the last committed round and re-logs that round from the
manifest: TensorBoard then hides whatever an earlier session logged at or after that step, so
the curves continue without duplicates even if the previous driver died between committing a
round and logging it. Event-file names end in a nanosecond clock so files sort in session
order (TensorBoard applies purges in file order; tensorboardX's own names only have seconds).

For s3:// runs the writer works in a local temporary directory and the event file is uploaded
(whole, it is small) to RUN/tb/ after every round, through :class:`~memshard.io.storage.Storage`.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from memshard.io.storage import Storage

TB_DIR = "tb"

# summary key -> tag; grouped by the part before "/" in TensorBoard's UI
ROUND_TAGS = {
    "loss": "round/loss",
    "skip_rate": "round/skip_rate",
    "images_per_s": "round/images_per_s",
    "round_s": "round/round_s",
    "migrated": "round/migrated",
    "augmented": "round/augmented",
    "mean_strength": "round/aug_strength",
    "samples_skipped_once": "round/samples_skipped_once",
}
SHARD_SKIP_TAG = "shard_skip_rate/shard-{shard:03d}"
SHARD_LOSS_TAG = "shard_loss/shard-{shard:03d}"


def round_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The scalars of one round summary (the manifest's ``rounds[i]``), keyed by tag."""
    out: dict[str, float] = {}
    for key, tag in ROUND_TAGS.items():
        value = summary.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[tag] = float(value)
    for shard in summary.get("shards", []):
        if "skip_rate" in shard:
            out[SHARD_SKIP_TAG.format(shard=int(shard["shard"]))] = float(shard["skip_rate"])
        if "loss" in shard:
            out[SHARD_LOSS_TAG.format(shard=int(shard["shard"]))] = float(shard["loss"])
    return out


class RoundLogger:
    """Writes round summaries into RUN/tb/ (locally, or staged and uploaded for remote runs).

    Synchronous on purpose (tensorboardX's ``EventsWriter``, not ``SummaryWriter``, whose
    background queue can still hold a round when we upload or a reader looks): after
    :meth:`log_round` returns, the round is in the file.
    """

    def __init__(self, run_uri: str, purge_step: int | None = None) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.store = Storage(run_uri)
        self._staging = None if self.store.local else tempfile.mkdtemp(prefix="memshard-tb-")
        self.logdir = self.store.path(TB_DIR) if self.store.local else self._staging
        os.makedirs(self.logdir, exist_ok=True)
        suffix = f".{time.time_ns():020d}"  # unique, and sorts after every earlier session's file
        self._writer = EventsWriter(os.path.join(self.logdir, "events"), suffix)
        self.path = next(os.path.join(self.logdir, n) for n in os.listdir(self.logdir) if n.endswith(suffix))
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._writer.write_event(Event(wall_time=time.time(), step=int(purge_step), session_log=start))
            self._writer.flush()

    def log_round(self, summary: dict[str, Any]) -> None:
        """One point per tag at step = the summary's round id, flushed (and uploaded) at once."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=t, simple_value=v) for t, v in round_scalars(summary).items()]
        event = Event(wall_time=time.time(), step=int(summary["round"]), summary=Summary(value=values))
        self._writer.write_event(event)
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self._staging is None:
            return
        with open(self.path, "rb") as fh:
            self.store.write_bytes(f"{TB_DIR}/{os.path.basename(self.path)}", fh.read())

    def close(self) -> None:
        self._writer.close()
        self._upload()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


# --------------------------------------------------------------------------- reading back


def _records(data: bytes) -> Iterable[bytes]:
    """TFRecord framing: u64 length, masked crc32c of it, payload, masked crc32c of payload (little-endian)."""
    from tensorboardX.record_writer import masked_crc32c

    pos = 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"corrupt event record header at byte {pos}")
        body = data[pos + 12 : pos + 12 + length]
        if len(body) < length or pos + 16 + length > len(data):
            return  # a record still being written: the reader stops there, as TensorBoard does
        (bcrc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        if bcrc != masked_crc32c(body):
            raise ValueError(f"corrupt event record at byte {pos}")
        yield body
        pos += 16 + length


def read_scalars(run_uri: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of RUN/tb/ as TensorBoard shows them: files in name order, purges applied, sorted by step.

    Needs no ``tensorboard`` install (tensorboardX's protobufs parse the events), which is what
    `memshard report` and the tests use.
    """
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    store = Storage(run_uri)
    points: dict[str, list[tuple[int, float]]] = {}
    for name in store.listdir(TB_DIR):
        if ".tfevents." not in name:
            continue
        for raw in _records(store.read_bytes(f"{TB_DIR}/{name}")):
            event = Event.FromString(raw)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                points = {t: [p for p in pts if p[0] < event.step] for t, pts in points.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    points.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return {tag: sorted(pts) for tag, pts in points.items()}
