"""Fault injection: find a run's processes and kill them, the way a preempted node would.

Used by the fault tests and by ``jobs/chaos.py``. Nothing here is a mock: the victims are
the real Ray worker processes (found by the process titles Ray gives them, ``ray::ShardActor``
and ``ray::Coordinator``) or the real driver process, and they get SIGKILL, which no code can
intercept, so what survives is only what the run directory had committed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VICTIMS = ("shard", "coordinator", "driver")
TITLES = {"shard": "ray::ShardActor", "coordinator": "ray::Coordinator"}


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the (comm)


def descends_from(pid: int, root: int) -> bool:
    """Is ``root`` among the ancestors of ``pid`` (or ``pid`` itself)?"""
    seen = 0
    while pid and seen < 64:
        if pid == root:
            return True
        parent = _parent(pid)
        if parent is None or parent == pid:
            return False
        pid, seen = parent, seen + 1
    return False


def ray_processes(title: str, root: int | None = None) -> list[int]:
    """PIDs of live processes whose title (argv[0] as Ray sets it) starts with ``title``.

    With ``root``, only descendants of that process: the workers of the Ray cluster it started,
    never those of another cluster on the same machine (another test session, another user).
    """
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours
            continue
        if argv0.startswith(title) and (root is None or descends_from(int(proc.name), root)):
            out.append(int(proc.name))
    return sorted(out)


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` (SIGKILL: a crash; SIGSTOP: a hung node) to ``pid``; False if it was already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Killer:
    """A thread that waits for ``trigger`` (a process title prefix) to appear, then ``delay_s``, then
    SIGKILLs one process titled ``victim`` (the ``index``-th of them, modulo their number).

    Trigger on ``ray::ShardActor.train_round`` (the title Ray gives an actor process while it
    runs that method) and the kill lands mid-round rather than between rounds.
    """

    victim: str
    delay_s: float
    trigger: str = "ray::ShardActor.train_round"
    index: int = 0
    timeout_s: float = 300.0
    sig: int = signal.SIGKILL
    root: int = field(default_factory=os.getpid)  # the process that started the Ray cluster
    killed: list[int] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _old: set[int] = field(default_factory=set)

    def start(self) -> Killer:
        # processes already there (a previous run's actors, still exiting) are never a trigger or a victim
        self._old = set(self._find(self.trigger)) | set(self._find(self.victim))
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"killer-{self.victim}")
        self._thread.start()
        return self

    def _find(self, title: str) -> list[int]:
        return ray_processes(title, root=self.root)

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not set(self._find(self.trigger)) - self._old:
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        if self._stop.wait(self.delay_s):
            return
        pids = [p for p in self._find(self.victim) if p not in self._old]
        if pids and kill(pids[self.index % len(pids)], self.sig):
            self.killed.append(pids[self.index % len(pids)])

    def join(self, timeout: float | None = None) -> list[int]:
        """Stop waiting (a kill not yet made is not made) and return the PIDs killed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.killed


def same_weights(a: str, b: str, r: int) -> list[str]:
    """Names of the tensors (raw ``name``, EMA ``ema/name``) of round ``r`` that differ between runs ``a``
    and ``b``; empty when every bit is equal."""
    import torch

    from memshard.io.rundir import RunDir

    (raw_a, ema_a), (raw_b, ema_b) = RunDir(a).load_weights(r), RunDir(b).load_weights(r)
    diff = sorted(set(raw_a) ^ set(raw_b))
    diff += [n for n in sorted(set(raw_a) & set(raw_b)) if not torch.equal(raw_a[n], raw_b[n])]
    if (ema_a is None) != (ema_b is None):
        return [*diff, "ema (present in one run only)"]
    ema_a, ema_b = ema_a or {}, ema_b or {}
    diff += [f"ema/{n}" for n in sorted(set(ema_a) | set(ema_b)) if n not in ema_a or n not in ema_b
             or not torch.equal(ema_a[n], ema_b[n])]  # fmt: skip
    return diff


def committed_rounds(run: str) -> int:
    """Rounds the manifest of local run directory ``run`` says are committed (0 when there is none yet)."""
    import json

    try:
        return int(json.loads((Path(run) / "run.json").read_text())["rounds_completed"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def wait_for_round(run: str, r: int, alive: Callable[[], bool], timeout_s: float = 300.0) -> bool:
    """Wait until ``run`` has ``r`` committed rounds; False if ``alive()`` turns false or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if committed_rounds(run) >= r:
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return False
