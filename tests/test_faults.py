"""Processes killed mid-run (SIGKILL: nothing can clean up) and the run still ends where an
uninterrupted one ends, bit for bit on CPU.

* a shard actor killed mid-round: Ray restarts it (``max_restarts``), it reloads the last
  committed round, the retried ``train_round`` redoes the round; no resume needed;
* the coordinator killed mid-round: same, from its committed ledger;
* the driver killed: the job's actors die with it; the same command with ``--resume``
  continues from the last committed round.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memshard.config import load_config
from memshard.runtime.driver import RunError, train
from memshard.testing.chaos import Killer, committed_rounds, ray_processes, same_weights, wait_for_round
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray
FAULT = [*TINY, "train.rounds=3", "train.steps_per_round=6"]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("faults") / "reference")
    train(load_config("demo", FAULT), out=out)
    return out


@pytest.mark.parametrize(
    ("victim", "delay_s"),
    [("ray::ShardActor", 0.3), ("ray::Coordinator", 0.2)],
    ids=["shard-actor", "coordinator"],
)
def test_killed_actor_is_restarted_and_the_round_redone(reference, tmp_path, victim, delay_s):
    out = str(tmp_path / "run")
    killer = Killer(victim=victim, delay_s=delay_s, index=1).start()
    try:
        outcome = train(load_config("demo", FAULT), out=out)
    finally:
        killed = killer.join(timeout=10)
    assert killed, f"no {victim} process was killed (did the run end before the kill?)"
    assert outcome.complete and outcome.rounds_completed == 3
    assert same_weights(out, reference, 3) == []


def test_actor_dead_for_good_fails_clearly_keeps_committed_rounds_and_resumes(reference, tmp_path):
    """No restarts left (as when a node is gone for good): a clear error, nothing committed lost."""
    out = str(tmp_path / "run")
    killer = Killer(victim="ray::ShardActor", delay_s=0.2).start()
    try:
        with pytest.raises(RunError, match=r"could not be restarted.*rerun with --resume"):
            train(load_config("demo", [*FAULT, "resources.actor_max_restarts=0"]), out=out)
    finally:
        assert killer.join(timeout=10)
    committed = committed_rounds(out)
    assert committed < 3
    outcome = train(load_config("demo", FAULT), out=out, resume=True)  # resources.* may change on resume
    assert outcome.rounds_completed == 3 and same_weights(out, reference, 3) == []


def test_hung_shard_actor_fails_the_round_after_the_stall_timeout(reference, tmp_path):
    """A frozen process (SIGSTOP: a hung node) makes no progress; the run stops instead of hanging."""
    out = str(tmp_path / "run")
    killer = Killer(victim="ray::ShardActor", delay_s=0.2, sig=signal.SIGSTOP).start()
    try:
        with pytest.raises(RunError, match=r"made no progress for 20s.*rerun with --resume"):
            train(load_config("demo", [*FAULT, "resources.stall_timeout_s=20"]), out=out)
    finally:
        stopped = killer.join(timeout=10)
        for pid in stopped:  # the driver's clean-up SIGKILLs it; make sure nothing stays frozen
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert stopped
    outcome = train(load_config("demo", FAULT), out=out, resume=True)
    assert outcome.rounds_completed == 3 and same_weights(out, reference, 3) == []


def test_a_round_longer_than_the_stall_timeout_finishes_while_its_shards_report_progress(ray_cluster, tmp_path):
    """The stall timeout is for silence, not for long rounds: progress reports must reach the driver.

    (They did not while the coordinator sat in record_round waiting for the round's statistics:
    a 30-minute round failed at the default 1800 s.)
    """
    stall_s = 30
    overrides = ["train.rounds=1", "train.steps_per_round=600", f"resources.stall_timeout_s={stall_s}"]
    cfg = load_config("demo", [*TINY, *overrides])
    outcome = train(cfg, out=str(tmp_path / "run"))
    assert outcome.complete
    round_s = json.loads((tmp_path / "run" / "run.json").read_text())["rounds"][0]["round_s"]
    assert round_s > stall_s, f"the round took {round_s:.0f}s: too short to test the stall timeout"


def test_killed_driver_resumes_to_the_same_weights(reference, tmp_path, ray_cluster):
    """The driver as a separate process (a `ray job`) on the same cluster, SIGKILLed in round 2."""
    run = tmp_path / "run"
    args = [a for s in FAULT for a in ("--set", s)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "memshard", "train", "demo", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for_round(str(run), 1, alive=lambda: proc.poll() is None), "round 1 was never committed"
        time.sleep(0.5)  # into round 2
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = committed_rounds(str(run))
    assert 1 <= committed < 3, "the kill did not land before the end of the run"
    # the dead job's actors are released by Ray; the resumed run must not wait for them
    outcome = train(load_config("demo", FAULT), out=str(run), resume=True)
    assert outcome.complete and outcome.rounds_completed == 3
    assert same_weights(str(run), reference, 3) == []
    assert ray_processes("ray::ShardActor.train_round", root=os.getpid()) == []


def test_chaos_job_all_runs_complete_and_equal(tmp_path):
    """`jobs/chaos.py` in its small form: one kill of each kind, all complete, all bit-identical."""
    report = tmp_path / "chaos.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/chaos.py", "--runs", "3", "--seed", "1", "--json", str(report)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "3/3 completed, 3/3 equal"
    summary = json.loads(report.read_text())["summary"]
    assert summary["by_victim"] == {"shard": 1, "coordinator": 1, "driver": 1}
    assert summary["kills"] == 3 and summary["redone"] >= 3  # every kill landed, and cost a redo
