"""`ray job submit` of the training entrypoint against a real local Ray head (issue: running it for real).

Starts `ray start --head` (with the dashboard's job server, from ray[default]) in its own
temp dir and ports, submits `jobs/train.py` with `--working-dir` (Ray uploads the checkout,
.gitignore respected), waits for the job, checks the served model in the run directory (an
absolute path outside the working dir: outputs never go to the job's working directory),
and stops the head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head of its own (`ray start --head --block` in a new process group).

    Stopped by signalling that group, never with `ray stop`, which would kill every Ray
    process on the machine (the test session's own cluster included).
    """
    if not os.path.exists(RAY):
        pytest.skip("the ray CLI is not installed next to this Python")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    temp = f"/tmp/ray-head-{os.getpid()}"  # Ray's unix socket paths must stay short
    # Every port of its own: the defaults (e.g. the job agent's 52365) may be held by another
    # Ray cluster on the machine, and a head whose agent cannot bind never accepts a job.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port", "runtime-env-agent-port",
    )]  # fmt: skip
    cmd = [
        RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats",
        *ports,
    ]  # fmt: skip
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # the job server answers once the dashboard is up
            st = subprocess.run([RAY, "job", "list", "--address", address], env=env, timeout=60, capture_output=True)
            if st.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up in 180 s")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever outlived the head's own 30 s drain (workers, agents) goes with the group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_ray_job_submit_trains_a_tiny_run(ray_head, tmp_path):
    address, env = ray_head
    run = tmp_path / "run"
    args = ["demo", "--set", "data.limit=48", "--set", "shards.count=2", "--set", "train.rounds=1",
            "--set", "train.steps_per_round=2", "--set", "train.batch_size=8", "--set", "train.warmup_steps=1",
            "--set", "resources.cpus_per_shard=0.5", "--set", "logging.progress=false", "--out", str(run)]  # fmt: skip
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--no-wait", "--",
              "python", "jobs/train.py", *args]  # fmt: skip
    deadline = time.time() + 240
    while True:  # the head's job agent registers a little after its job server answers
        out = subprocess.run(submit, env=env, timeout=300, capture_output=True, text=True)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr)[0]  # the output has ANSI codes
    deadline = time.time() + 600
    status, final = "", None
    while time.time() < deadline:  # the CLI logs the state on stderr: "Job '...' succeeded" / "... failed"
        st = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env, timeout=60,
                            capture_output=True, text=True)  # fmt: skip
        status = st.stdout + st.stderr
        final = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", status) if st.returncode == 0 else None
        if final:
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, timeout=60,
                          capture_output=True, text=True).stdout  # fmt: skip
    assert final is not None and final[1] == "succeeded", f"{status[-3000:]}\n{logs[-3000:]}"
    # the outputs are where --out said (storage), not in the job's unpacked copy of the working dir
    assert f"committed in {run}" in logs
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["rounds_completed"] == 1
    assert (run / "served" / "model_index.json").is_file()
    assert "done: 1 round(s) committed" in logs
