"""The Ray driver of an IET-AGC run: rounds of parallel proxy training, aggregation, commit.

One round r:
  1. every shard actor trains its proxy from the global weights (one object-store ref,
     shared by all actors) and commits its own optimizer/bank state to RUN/rounds/r;
  2. the aggregation task streams the proxies' weights into the size-weighted average and
     commits it to RUN/rounds/r; its result ref is the next round's broadcast;
  3. the coordinator writes the round's per-sample statistics and the next assignment;
  4. the driver commits the round by writing the manifest (last), then publishes served/,
     logs the round to RUN/tb/ (TensorBoard) and calls ``on_round`` (a sweep trial's report).

The driver holds no training state: everything it needs to continue is in the run
directory, which is what ``--resume`` (and a restarted driver) reads.

Run inside a placement group (a Tune trial of ``memshard sweep``, whose
``PlacementGroupFactory`` reserved one bundle per shard), the shard actors go into that
group's last K bundles instead of a new, nested group, which could never be placed once
the trials' groups hold the cluster.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from memshard.config import MemshardConfig, build_config
from memshard.data import prepare
from memshard.data.conditioning import build_caches
from memshard.data.ingest import Ingested, check_dataset, format_bad, ingest
from memshard.data.prepare import parse_duplicate
from memshard.iet.proxy import steps_for
from memshard.iet.schedule import starts_from_own_weights
from memshard.io.rundir import RunDir, WarmStart, load_warm_start, table_bytes
from memshard.io.storage import S3Access, access_installed
from memshard.models.unet import build_scheduler, build_unet, unet_config, unet_shapes
from memshard.runtime.actors import ShardActor, aggregate_round
from memshard.runtime.coordinator import Coordinator
from memshard.runtime.progress import RoundProgress, console
from memshard.runtime.tasks import remote_call
from memshard.runtime.tensorboard import RoundLogger
from memshard.serving.publish import publish_served

# Keys that may change when a run is resumed (everything else must match the stored config).
RESUMABLE_KEYS = ("train.rounds", "logging", "resources", "storage", "sample", "sweep")


class RunError(RuntimeError):
    """A problem with the run directory or the cluster, worded for the user."""


@dataclass
class TrainOutcome:
    run_uri: str
    rounds_completed: int
    served: str
    manifest: dict[str, Any]
    complete: bool = True  # False when ``stop_after_s`` ended the call before cfg.train.rounds


def default_run_dir(cfg: MemshardConfig) -> str:
    return os.path.join("runs", f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def resolve_run_dir(cfg: MemshardConfig, out: str | None, resume: bool) -> str | None:
    """Where a run goes: ``out``, else ``storage.run_dir``, else a new runs/<name>-<time> (None: resume without one)."""
    return out or cfg.storage.run_dir or (None if resume else default_run_dir(cfg))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(stored: dict[str, Any], given: MemshardConfig) -> MemshardConfig:
    """The stored config with the resumable keys taken from ``given``; other differences are errors."""
    a, b = _flatten(stored), _flatten(given.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    fixed = [k for k in diff if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_KEYS)]
    if fixed:
        raise RunError(
            "--resume with a config that differs from the run's in: "
            + ", ".join(fixed)
            + " (only train.rounds, logging, resources, storage, sample and sweep may change)"
        )
    return build_config(given.to_dict())


def connect(cfg: MemshardConfig) -> None:
    """Join the configured cluster (resources.address / RAY_ADDRESS) or start a local one."""
    if ray.is_initialized():
        return
    address = cfg.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.resources.local_num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)


def shard_resources(cfg: MemshardConfig) -> dict[str, float]:
    gpus = cfg.resources.gpus_per_shard
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"CPU": cfg.resources.cpus_per_shard, "GPU": gpus}


def check_resources(cfg: MemshardConfig, need: dict[str, float]) -> None:
    """Fail now, with numbers, rather than wait forever for resources that do not exist."""
    have = ray.cluster_resources()
    k = cfg.shards.count
    for res, per in need.items():
        if per * k > have.get(res, 0) + 1e-9:
            raise RunError(
                f"{k} shard actors need {per * k:g} {res} in total ({per:g} each, resources.{res.lower()}s_per_shard) "
                f"but the Ray cluster has {have.get(res, 0):g}"
            )


def _prepare_data(cfg: MemshardConfig, workdir: str, in_process: bool = False) -> tuple[str, Ingested]:
    """Resolve and validate the dataset. Built-in sources are prepared into ``workdir`` first."""
    if cfg.data.source is not None:
        local = os.path.join(workdir, f"{cfg.data.source}.parquet")
        d = cfg.data
        duplicate = None if d.duplicate is None else parse_duplicate(d.duplicate)
        prepare(
            d.source,
            local,
            image_size=d.image_size,
            channels=d.channels,
            limit=d.limit if duplicate else None,
            duplicate=duplicate,
            duplicate_seed=d.duplicate_seed,
        )
        return local, ingest(cfg, local, in_process=True)
    return cfg.data.path, ingest(cfg, cfg.data.path, in_process=in_process)


def warm_start(cfg: MemshardConfig) -> WarmStart | None:
    """The round-0 weights ``train.init_from`` names, checked against the config's UNet (RunError if bad)."""
    if cfg.train.init_from is None:
        return None
    try:
        return load_warm_start(cfg.train.init_from, unet_shapes(cfg))
    except (ValueError, OSError) as exc:
        raise RunError(str(exc)) from None


def _create_run(
    cfg: MemshardConfig,
    run: RunDir,
    data_local: str,
    ingested: Ingested,
    coordinator: Any,
    in_process: bool = False,
    init: WarmStart | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write round 0 (data copy, initial split, initial or warm-start weights) and the manifest."""
    data_uri = ingested.uri
    if cfg.data.source is not None:
        with open(data_local, "rb") as fh:
            run.store.write_bytes(f"data/{cfg.data.source}.parquet", fh.read())
        data_uri = run.store.uri_of(f"data/{cfg.data.source}.parquet")
    if ingested.bad:
        ids = np.array([i for i, _ in ingested.bad], dtype=np.int64)
        run.store.write_bytes("bad_rows.parquet", table_bytes({"id": ids, "reason": [r for _, r in ingested.bad]}))
    caches = build_caches(cfg, data_uri, ingested.ids, in_process=in_process)
    sizes = ray.get(coordinator.initial_assignment.remote(ingested.ids, ingested.labels, cfg.shards.policy, cfg.seed))
    if init is not None:  # the source's EMA when it kept one (the model it would serve), else its raw weights
        raw = init.raw
        ema = (init.ema if init.ema is not None else init.raw) if cfg.train.ema else None
    else:
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg)
        raw = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ema = raw if cfg.train.ema else None
    run.save_weights(0, raw, ema)
    manifest = {
        "config": cfg.to_dict(),
        "data_uri": data_uri,
        "num_samples": len(ingested.ids),
        "bad_rows": len(ingested.bad),
        "initial_shard_sizes": sizes,
        "caches": caches.as_dict(),
        "rounds_completed": 0,
        "rounds": [],
        "created": time.time(),
    }
    if init is not None:
        manifest["init"] = init.manifest_entry()
    run.write_manifest(manifest)
    return data_uri, manifest


def _publish_served(
    run_uri: str, weights: tuple[dict, dict | None], unet_cfg: dict, sched_cfg: dict, info: dict
) -> None:
    raw, ema = weights
    model_cfg = info.get("model")
    publish_served(RunDir(run_uri), unet_cfg, sched_cfg, raw, ema, info, model_cfg=model_cfg)


def shard_bundles(pg: PlacementGroup, bundle: dict[str, float], k: int) -> list[int]:
    """Indices of the bundles of an existing placement group the K shard actors go into: its last K.

    The last K, because Tune's ``PlacementGroupFactory([head, shard, ...])`` puts the trial's
    own bundle first (and drops it when empty). Each must hold a shard actor, or the actor
    would wait forever for resources its group never had.
    """
    specs = pg.bundle_specs
    if len(specs) < k:
        raise RunError(f"the placement group this run is inside has {len(specs)} bundle(s); {k} shard actors need {k}")
    indices = list(range(len(specs) - k, len(specs)))
    for i in indices:
        short = {r: v for r, v in bundle.items() if specs[i].get(r, 0) + 1e-9 < v}
        if short:
            raise RunError(
                f"bundle {i} of the enclosing placement group ({specs[i]}) cannot hold a shard actor ({bundle})"
            )
    return indices


def train(
    cfg: MemshardConfig,
    out: str | None = None,
    resume: bool = False,
    stop_after_s: float | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    until_round: int | None = None,
) -> TrainOutcome:
    """Run (or resume) an IET-AGC training run; returns where the served model is.

    ``stop_after_s`` bounds one call: no round starts that would, at the pace of the last one,
    end later than that many seconds after the call began. The committed rounds stay; calling
    again with ``resume=True`` continues. This is how a run fits machines lent in slices
    (a 10-minute command limit) or preemptible nodes.

    ``on_round(summary)`` is called after each round is committed and served (a sweep trial
    reports it to Tune there). If it raises, the run stops after that round, which stays
    committed, and the exception propagates.

    ``until_round`` stops this call after that round even if ``train.rounds`` is larger: a run
    configured for its longest budget can be trained in stages (the frontier benchmark trains an
    arm until it reaches the baseline's quality) with the same schedule as one call, since
    everything between rounds (migrations, warm-up) depends on ``train.rounds``, not on the call.
    """
    # S3 settings from the config (over the environment) hold for this call only; workers get them
    # as an argument (remote_call, actor constructors), never through the runtime env.
    with access_installed(S3Access.resolve(cfg.storage)):
        return _train(cfg, out, resume, stop_after_s, on_round, until_round)


def _train(
    cfg: MemshardConfig,
    out: str | None,
    resume: bool,
    stop_after_s: float | None,
    on_round: Callable[[dict[str, Any]], None] | None,
    until_round: int | None = None,
) -> TrainOutcome:
    call_t0 = time.perf_counter()
    access = S3Access.resolve() or None
    run_uri = resolve_run_dir(cfg, out, resume)
    if run_uri is None:
        raise RunError("--resume needs the run directory: pass --out RUN (or storage.run_dir)")
    run = RunDir(run_uri)
    manifest = run.manifest()
    if resume:
        if manifest is None:
            raise RunError(f"--resume: {run_uri} holds no run (no run.json)")
        cfg = resume_config(manifest["config"], cfg)
    elif manifest is not None or run.store.listdir():
        raise RunError(
            f"run directory {run_uri} already exists and is not empty: pass --resume to continue it, or another --out"
        )

    try:  # the model must be buildable from the config (preset, pipeline dir, text encoder) before any work
        unet_config(cfg)
        build_scheduler(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise RunError(f"model: {exc}") from None
    if not resume and cfg.data.path is not None:
        check_dataset(cfg, cfg.data.path)  # before the cluster's start-up, which takes seconds to minutes
    init = None if resume else warm_start(cfg)
    connect(cfg)
    need = shard_resources(cfg)
    check_resources(cfg, need)
    # Inside a placement group (a sweep trial): its bundles were sized for the shard actors only, so
    # one-off 1-CPU tasks (ingest validation, condition caches) run in this process instead.
    enclosing_pg = get_current_placement_group()
    in_process = enclosing_pg is not None
    coordinator_name = f"memshard-coordinator-{uuid.uuid4().hex[:12]}"
    coordinator = Coordinator.options(
        name=coordinator_name,
        max_restarts=cfg.resources.actor_max_restarts,
        max_task_retries=cfg.resources.actor_max_restarts,
    ).remote(run_uri, cfg.model_dump_json(), access)

    try:
        if not resume:
            workdir = tempfile.mkdtemp(prefix="memshard-data-")
            try:
                data_local, ingested = _prepare_data(cfg, workdir, in_process=in_process)
                if ingested.bad:
                    bad = format_bad(ingested.bad)
                    console.print(f"[yellow]dropped {len(ingested.bad)} bad row(s):[/yellow]\n{bad}")
                data_uri, manifest = _create_run(
                    cfg, run, data_local, ingested, coordinator, in_process=in_process, init=init
                )
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            data_uri = manifest["data_uri"]
            run.discard_uncommitted(int(manifest["rounds_completed"]))
            manifest["config"] = cfg.to_dict()
    except BaseException:
        ray.kill(coordinator)  # refused data or a failed set-up: no actor outlives the call
        raise

    committed = int(manifest["rounds_completed"])
    unet_cfg = unet_config(cfg)
    sched_cfg = dict(build_scheduler(cfg).config)
    model_info = cfg.model.model_dump(mode="json")

    def info_of(r: int) -> dict[str, Any]:
        return {"round": r, "run": run_uri, "model": model_info}

    k = cfg.shards.count

    bundle = {r: v for r, v in need.items() if v > 0} or {"CPU": 0.001}
    if enclosing_pg is not None:
        pg, bundle_index = enclosing_pg, shard_bundles(enclosing_pg, bundle, k)
    else:
        pg = placement_group([dict(bundle) for _ in range(k)], strategy=cfg.resources.placement_strategy)
        bundle_index = list(range(k))
        ready, _ = ray.wait([pg.ready()], timeout=cfg.resources.placement_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise RunError(
                f"could not place {k} shard actors ({bundle} each, {cfg.resources.placement_strategy}) "
                f"within {cfg.resources.placement_timeout_s:g}s; cluster has {ray.cluster_resources()}"
            )
    config_json = cfg.model_dump_json()
    actors = [
        ShardActor.options(
            num_cpus=need["CPU"],
            num_gpus=need["GPU"],
            max_restarts=cfg.resources.actor_max_restarts,
            max_task_retries=cfg.resources.actor_max_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index[i]),
        ).remote(config_json, run_uri, data_uri, i, coordinator_name, access)
        for i in range(k)
    ]
    tb: RoundLogger | None = None
    try:
        if cfg.logging.tensorboard:
            # a resume re-logs its last committed round over whatever an earlier session logged from there on
            tb = RoundLogger(run_uri, purge_step=committed if committed > 0 else None)
            if committed > 0 and manifest["rounds"]:
                tb.log_round(manifest["rounds"][-1])
        global_ref = ray.put(run.load_weights(committed, expected=unet_shapes(cfg)))
        if resume and committed > 0:
            ray.get(
                remote_call(_publish_served, run_uri, global_ref, unet_cfg, sched_cfg, info_of(committed), num_cpus=0)
            )
        if committed >= cfg.train.rounds:
            console.print(f"run {run_uri} already has {committed} committed round(s); nothing to do")
        sizes = manifest["rounds"][-1]["shard_sizes"] if manifest["rounds"] else manifest["initial_shard_sizes"]
        last_round_s = 0.0
        own_weights_next = committed > 0 and starts_from_own_weights(cfg, committed)
        with RoundProgress(enabled=cfg.logging.progress) as progress:
            last = cfg.train.rounds if until_round is None else min(cfg.train.rounds, until_round)
            for r in range(committed + 1, last + 1):
                t0 = time.perf_counter()
                if stop_after_s is not None and t0 - call_t0 + last_round_s > stop_after_s:
                    console.print(f"stopping before round {r}: the {stop_after_s:g}s budget of this call is spent")
                    break
                total_steps = sum(steps_for(cfg, s) for s in sizes)
                progress.start_round(r, cfg.train.rounds, total_steps)
                start_ref = None if own_weights_next else global_ref
                outs = [a.train_round.remote(r, start_ref) for a in actors]
                weight_refs = [o[0] for o in outs]
                stat_refs = [o[1] for o in outs]
                agg_ref = remote_call(aggregate_round, run_uri, r, weight_refs, num_cpus=0)
                # record_round is submitted once the statistics exist: it ray.get()s them, and the
                # coordinator (one thread) would answer no progress call while it waits, so a round
                # longer than stall_timeout_s would look stalled. A hung record_round still fails.
                _wait_with_progress([*stat_refs, agg_ref], coordinator, progress, r, cfg.resources.stall_timeout_s)
                summary_ref = coordinator.record_round.remote(r, stat_refs)
                _wait_with_progress([summary_ref], coordinator, progress, r, cfg.resources.stall_timeout_s)
                summary = ray.get(summary_ref)
                summary["round_s"] = time.perf_counter() - t0
                summary["images_per_s"] = summary["steps"] * cfg.train.batch_size / summary["round_s"]
                manifest["rounds"].append(summary)
                manifest["rounds_completed"] = r
                run.write_manifest(manifest)  # the commit point of round r
                ray.get(remote_call(_publish_served, run_uri, agg_ref, unet_cfg, sched_cfg, info_of(r), num_cpus=0))
                progress.round_done(summary)
                if tb is not None:
                    tb.log_round(summary)
                sizes = summary["shard_sizes"]
                global_ref = agg_ref
                last_round_s = summary["round_s"]
                own_weights_next = starts_from_own_weights(cfg, r)
                if on_round is not None:
                    on_round(summary)
    finally:
        if tb is not None:
            tb.close()
        for a in actors:
            ray.kill(a)
        ray.kill(coordinator)
        if enclosing_pg is None:
            remove_placement_group(pg)  # never the enclosing group: it belongs to the sweep trial
    final = run.manifest()
    served = run.store.uri_of("served")
    console.print(
        f"[bold green]done[/bold green]: {final['rounds_completed']} round(s) committed in {run_uri}; "
        f"served model: {served}"
    )
    done = int(final["rounds_completed"])
    return TrainOutcome(
        run_uri=run_uri, rounds_completed=done, served=served, manifest=final, complete=done >= cfg.train.rounds
    )


def _wait_with_progress(
    refs: list[ray.ObjectRef], coordinator: Any, progress: RoundProgress, r: int, stall_timeout_s: float
) -> None:
    """Wait for round ``r``'s results, updating the progress display.

    Fails with a RunError (the committed rounds stay; ``--resume`` continues) when a shard
    actor is dead for good (its restarts used up) or when nothing has moved for
    ``stall_timeout_s``: a restarted actor waiting for a node that never comes back would
    otherwise hang the run forever.
    """
    pending = list(refs)
    last_state: Any = None
    last_change = time.monotonic()
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        try:
            state = ray.get(coordinator.progress.remote(), timeout=5)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            state = last_state  # the coordinator is restarting; its calls are retried
        if state != last_state:
            last_state, last_change = state, time.monotonic()
            progress.update(sum(d for (rr, d, _t) in (state or {}).values() if rr == r))
        elif pending and time.monotonic() - last_change > stall_timeout_s:
            raise RunError(
                f"round {r} made no progress for {stall_timeout_s:g}s (resources.stall_timeout_s): a shard actor "
                f"may be waiting for resources that are gone (a lost node?); cluster has {ray.available_resources()}. "
                f"Rounds up to {r - 1} are committed; rerun with --resume when the cluster is whole again."
            )
    try:
        ray.get(refs)  # re-raise any task error here
    except ray.exceptions.RayActorError as exc:
        raise RunError(
            f"round {r}: an actor died and could not be restarted (resources.actor_max_restarts used up, or its "
            f"node is gone): {str(exc).splitlines()[0][:300]}. Rounds up to {r - 1} are committed; rerun with "
            "--resume to continue."
        ) from exc
