"""Chaos: tiny training runs, each with one process SIGKILLed at a random moment, must all
complete and end bit-identical to an uninterrupted run.

Victims, in a shuffled cycle so that every kind is hit once N >= 3:

* ``shard``: a shard actor process, mid-round (while it runs ``train_round``). Ray restarts
  it; it reloads the last committed round and the retried call redoes the round.
* ``coordinator``: the coordinator process, mid-round. Same recovery from its committed ledger.
* ``driver``: the driver (a separate ``memshard train`` process on the same cluster, as a
  ``ray job`` is) after a random number of committed rounds; its actors die with it. The same
  command with ``--resume`` then finishes the run.

Reported per run: the victim, when it was killed, rounds committed at that moment, the
shard-rounds or rounds redone, whether the run completed and whether its final raw and EMA
weights equal the uninterrupted run's bit for bit (CPU). The last line reads
``N/N completed, N/N equal``.

    python jobs/chaos.py --runs 6 --json runs/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tiny runs (48 digits, 2 shards) with rounds long enough (6 steps) for a kill to land mid-round.
OVERRIDES = [
    "data.limit=48",
    "shards.count=2",
    "train.steps_per_round=6",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "resources.cpus_per_shard=0.5",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def _kill_actor(cfg: Any, run: str, victim: str, delay: float, index: int) -> dict[str, Any]:
    from memshard.runtime.driver import train
    from memshard.testing.chaos import TITLES, Killer

    killer = Killer(victim=TITLES[victim], delay_s=delay, index=index).start()
    try:
        outcome = train(cfg, out=run)
    finally:
        killed = killer.join(timeout=10)
    return {"completed": outcome.complete, "killed": len(killed), "redone": len(killed)}


def _kill_driver(cfg: Any, run: str, overrides: list[str], delay: float, after: int) -> dict[str, Any]:
    import ray

    from memshard.runtime.driver import train
    from memshard.testing.chaos import committed_rounds, wait_for_round

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [
        sys.executable,
        "-m",
        "memshard",
        "train",
        "demo",
        *[a for o in overrides for a in ("--set", o)],
        "--out",
        run,
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        reached = wait_for_round(run, after, alive=lambda: proc.poll() is None)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    at_kill = committed_rounds(run)
    outcome = train(cfg, out=run, resume=True)
    return {
        "completed": outcome.complete,
        "killed": int(reached and at_kill < cfg.train.rounds),  # a kill after the last commit tests nothing
        "committed_at_kill": at_kill,
        "redone": int(at_kill < cfg.train.rounds),  # the round in progress is redone from its start
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seeds the victims, kill delays and shard choice")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="write the per-run results and the summary here")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.rounds < 2:
        ap.error("--runs must be >= 1 and --rounds >= 2 (a driver kill needs a committed round to resume from)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from memshard.config import load_config
    from memshard.runtime.driver import train
    from memshard.testing.chaos import VICTIMS, same_weights

    overrides = [*OVERRIDES, f"train.rounds={args.rounds}"]
    cfg = load_config("demo", overrides)
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp(prefix="memshard-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: list[dict[str, Any]] = []
    try:
        reference = str(out / "reference")
        t0 = time.perf_counter()
        train(cfg, out=reference)
        ref_s = time.perf_counter() - t0
        victims: list[str] = []
        while len(victims) < args.runs:
            cycle = list(VICTIMS)
            rng.shuffle(cycle)
            victims += cycle
        for i, victim in enumerate(victims[: args.runs]):
            run = str(out / f"run-{i:03d}-{victim}")
            # actor kills wait for a train_round to be running; a driver kill follows a commit, and a
            # round takes about 2 s here, so its delay stays short enough to land inside the next round
            delay = round(rng.uniform(0.0, 0.3 if victim == "driver" else 1.5), 3)
            row: dict[str, Any] = {"run": i, "victim": victim, "delay_s": delay}
            t0 = time.perf_counter()
            try:
                if victim == "driver":
                    row["after_round"] = rng.randrange(1, args.rounds)
                    row.update(_kill_driver(cfg, run, overrides, delay, row["after_round"]))
                else:
                    row["index"] = rng.randrange(cfg.shards.count)
                    row.update(_kill_actor(cfg, run, victim, delay, row["index"]))
                diff = same_weights(run, reference, args.rounds) if row["completed"] else ["(incomplete)"]
                row["equal"], row["differing"] = not diff, diff[:5]
            except Exception as exc:  # a failed run is a result to report, not the end of the job
                row.update(completed=False, equal=False, error=f"{type(exc).__name__}: {exc}"[:500])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            print(
                f"run {i}: killed {victim} ({row.get('killed', 0)}x, +{delay:.2f}s"
                + (f" after round {row['after_round']}" if "after_round" in row else "")
                + f"), redone {row.get('redone', 0)}, completed {row['completed']}, equal {row['equal']}"
                + (f", error {row['error']}" if "error" in row else ""),
                flush=True,
            )
    finally:
        ray.shutdown()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    n = len(results)
    completed = sum(bool(r["completed"]) for r in results)
    equal = sum(bool(r["equal"]) for r in results)
    kills = sum(int(r.get("killed", 0)) for r in results)
    redone = sum(int(r.get("redone", 0)) for r in results)
    summary = {
        "runs": n,
        "completed": completed,
        "equal": equal,
        "kills": kills,
        "redone": redone,
        "by_victim": {v: sum(r["victim"] == v for r in results) for v in VICTIMS},
        "reference_s": round(ref_s, 1),
        "rounds": args.rounds,
        "seed": args.seed,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(f"kills {kills}, rounds or shard-rounds redone {redone}, victims {summary['by_victim']}")
    print(f"{completed}/{n} completed, {equal}/{n} equal")
    return 0 if completed == n and equal == n else 1


if __name__ == "__main__":
    sys.exit(main())
