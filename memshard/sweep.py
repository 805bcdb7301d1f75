"""`memshard sweep`: hyperparameter search where every trial is a full IET-AGC(+) run, on Ray Tune.

A trial applies its sampled values to the base config and calls :func:`memshard.runtime.driver.train`
with ``out = DIR/trials/<trial id>``; the driver's ``on_round`` callback reports each committed
round to Tune (``ray.tune.report``: loss, skip rate, throughput, migrations), so ASHA can stop
a bad setting after ``sweep.grace_period`` rounds instead of paying for all of them. With
``sweep.evaluate`` the served model of a finished trial is evaluated (memorized fraction by the
1/3 rule, FID) and those figures ride on the trial's last report.

The frontier objective (``sweep.metric: frontier``) is the one the product is judged by: privacy
at equal quality. Before any trial, plain training (``method=baseline`` on the sweep's config,
with ``sweep.baseline`` overrides) is trained once into DIR/baseline (or ``sweep.baseline_run``)
and every checkpoint evaluated: its early-stopping frontier E(f) and matched quality Q = 1.05 x
its best FID (memshard.evaluation.metrics.frontier). Each trial then evaluates every committed
round with the same generations and reference, and reports each round's score
(:func:`~memshard.evaluation.metrics.frontier.frontier_score`: its memorized fraction at Q minus
E(Q), or a penalty above 1 while no checkpoint reaches Q), so ASHA stops trials on the very
figure the sweep ranks by. Evaluations are stored in each run directory and reused when a
retried trial or a later sweep asks again.

Resources: a trial's shard actors are long-lived and must be gang-placed, so each trial asks
Tune for a ``PlacementGroupFactory`` of an empty head bundle (the trial driver only
orchestrates; Tune then places it in the first shard bundle without reserving anything, and a
STRICT_SPREAD group needs no extra node for it) plus one bundle per shard. The driver sees it
runs inside that group and schedules its shard actors into the group's bundles instead of
creating a nested group that could never be placed. Evaluation reuses a shard bundle once the
shard actors are gone.

Outputs, all in DIR (local or s3://):

    DIR/trials/<trial id>/    a complete run directory per trial (served model, run.json, tb/)
    DIR/results.csv           one row per trial: its values, final metrics, status, Pareto flag
    DIR/pareto.png            memorized fraction vs FID (with evaluation) or loss vs skip rate;
                              frontier: every trial beside plain training's curve and Q
    DIR/points.csv            frontier: every evaluated checkpoint (baseline and trials)
    DIR/baseline/             frontier: plain training's run, evaluated at every checkpoint
    DIR/tune/                 Tune's own experiment state (local DIR only)

The trials' run manifests are the source of truth; Tune's experiment state is only a log
(its restore is fragile, see the Ray notes). A retried trial (``sweep.max_failures``) resumes
its own run directory. Pointing TensorBoard at DIR/trials compares the trials' curves.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import ray

from memshard.config import (
    EVAL_METRICS,
    ConfigError,
    MemshardConfig,
    ParamSpec,
    SweepConfig,
    build_config,
    load_config,
    parse_search_space,
    set_dotted,
)
from memshard.evaluation.metrics.frontier import Checkpoint, checkpoint_from_metrics, frontier_score, matched_quality
from memshard.io.rundir import RunDir
from memshard.io.storage import Storage, is_remote
from memshard.runtime.driver import RunError, check_resources, connect, shard_bundles, shard_resources, train
from memshard.runtime.progress import console
from memshard.runtime.tasks import remote_call

RESULTS_CSV = "results.csv"
POINTS_CSV = "points.csv"
BASELINE_DIR = "baseline"
EVAL_NAME = "sweep"
# What a frontier trial reports each round beside ROUND_KEYS (memshard.evaluation.metrics.frontier_score).
FRONTIER_KEYS = (
    "frontier", "reached", "matched_memorized", "early_stopping", "vs_early_stopping_rel", "matched_fid_limit",
    "round_chosen", "duplicated_copied", "last_fid", "last_memorized",
)  # fmt: skip
PARETO_PNG = "pareto.png"
TRIALS_DIR = "trials"
# Per-round figures a trial reports (the summary keys of memshard.runtime.coordinator / driver).
ROUND_KEYS = ("loss", "skip_rate", "images_per_s", "round_s", "migrated", "samples_skipped_once", "mean_strength")
# Config keys holding local paths: made absolute, because Tune runs each trial in its own working directory.
_PATH_KEYS = ("data.path", "data.cache_dir", "model.pipeline", "model.preset", "model.text_encoder", "prss.bank")
# Keys whose largest value decides whether a trial fits the cluster at all.
_RESOURCE_KEYS = ("shards.count", "resources.cpus_per_shard", "resources.gpus_per_shard")


# --------------------------------------------------------------------------- search space


def to_tune(spec: ParamSpec) -> Any:
    """The ray.tune domain of a parsed search-space string."""
    from ray import tune

    if spec.kind == "uniform":
        return tune.uniform(*spec.args)
    if spec.kind == "loguniform":
        return tune.loguniform(*spec.args)
    if spec.kind == "randint":
        return tune.randint(*spec.args)
    if spec.kind == "choice":
        return tune.choice(list(spec.args))
    if spec.kind == "grid":
        return tune.grid_search(list(spec.args))
    raise ConfigError(f"unknown distribution {spec.kind!r}")  # parse_search_space already refuses it


def search_space(params: dict[str, str]) -> dict[str, Any]:
    """``{dotted key: tune domain}`` from ``{dotted key: "uniform(1.1, 3)"}``."""
    out = {}
    for key, text in params.items():
        try:
            out[key] = to_tune(parse_search_space(text))
        except ValueError as exc:
            raise ConfigError(f"sweep.params.{key}: {exc}") from None
    return out


def parse_param(item: str) -> tuple[str, str]:
    """``KEY=SPACE`` of ``--param`` (split at the first '=': spaces may contain more)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise ConfigError(f"--param {item!r}: expected KEY=SPACE, e.g. agc.ratio=uniform(1.1,3)")
    return key.strip(), text.strip()


# --------------------------------------------------------------------------- configs


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers return them) -> Python, so configs and CSVs stay plain."""
    return value.item() if isinstance(value, np.generic) else value


def _absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    for key in _PATH_KEYS:
        section, name = key.split(".")
        value = raw.get(section, {}).get(name)
        if isinstance(value, str) and not is_remote(value) and os.path.exists(value):
            raw = set_dotted(raw, key, os.path.abspath(value))
    return raw


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> MemshardConfig:
    """The config of one trial: the base with the trial's values set (typed, no YAML round trip).

    The trial's own run records the values it used, not the space, so its ``sweep`` section is
    reset; the progress bar is off (trials log to Ray's worker logs, not a terminal).
    """
    raw = dict(base, sweep={})
    for key, value in params.items():
        raw = set_dotted(raw, key, _plain(value))
    raw = set_dotted(raw, "logging.progress", False)
    return build_config(raw)


def trial_resources(cfg: MemshardConfig) -> Any:
    """The trial's ``PlacementGroupFactory``: an empty head bundle for the trial driver, one per shard."""
    from ray import tune

    need = shard_resources(cfg)
    bundle = {r: v for r, v in need.items() if v > 0} or {"CPU": 0.001}
    return tune.PlacementGroupFactory(
        [{"CPU": 0}] + [dict(bundle) for _ in range(cfg.shards.count)], strategy=cfg.resources.placement_strategy
    )


def _check_fits(cfg: MemshardConfig) -> None:
    """Fail before Tune starts if even one trial (at the space's largest shard count / per-shard
    resources) cannot be placed: Tune would otherwise wait for it forever."""
    raw = cfg.to_dict()
    raw["sweep"] = {}
    for key, spec in cfg.sweep.spaces().items():
        if key in _RESOURCE_KEYS:
            values = [v for v in spec.candidates() if isinstance(v, int | float)]
            if values:
                raw = set_dotted(raw, key, max(values))
    big = build_config(raw)
    try:
        check_resources(big, shard_resources(big))
    except RunError as exc:
        raise RunError(f"no trial of this sweep fits the cluster: {exc}") from None


# --------------------------------------------------------------------------- one trial


def round_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports to Tune for one committed round."""
    out: dict[str, Any] = {"round": int(summary["round"])}
    for key in ROUND_KEYS:
        if isinstance(summary.get(key), int | float):
            out[key] = float(summary[key])
    return out


def eval_options(cfg: MemshardConfig, sweep: SweepConfig) -> Any:
    """The evaluation every trial (and the frontier's baseline) gets: same seeds, samples, reference.

    In process: a trial's driver runs inside its placement group, where evaluate's usual
    1-CPU / 1-GPU tasks could not be placed.
    """
    from memshard.evaluation.evaluate import EvalOptions

    return EvalOptions(
        num=sweep.eval_num,
        steps=sweep.eval_steps,
        name=EVAL_NAME,
        seed=cfg.seed,
        fid_reference=sweep.eval_reference,
        calibration_images=min(256, sweep.eval_reference or 256),
        batch_size=min(64, sweep.eval_num),
        in_process=True,
    )


def evaluate_trial(cfg: MemshardConfig, sweep: SweepConfig, run_uri: str) -> dict[str, Any]:
    """Memorized fraction and FID of a finished trial's served model.

    Runs as one task in one of the trial's shard bundles (free again once ``train`` returned:
    it kills its actors) with the shard's CPU/GPU, generating in that process: evaluate's usual
    1-CPU / 1-GPU tasks could not be placed in bundles sized for shard actors.
    """
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from memshard.evaluation.evaluate import evaluate

    opts = eval_options(cfg, sweep)
    need = shard_resources(cfg)
    task_options: dict[str, Any] = {"num_cpus": need["CPU"], "num_gpus": need["GPU"]}
    pg = get_current_placement_group()
    if pg is not None:
        bundle = {r: v for r, v in need.items() if v > 0} or {"CPU": 0.001}
        index = shard_bundles(pg, bundle, cfg.shards.count)[0]
        task_options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
    m = ray.get(remote_call(evaluate, run_uri, opts, options=task_options))
    out = {
        "memorized_fraction": float(m["memorized_fraction"]),
        "fid": float(m["fid"]),
        "copy_over_threshold": float(m["copy_similarity"]["over_threshold"]),
    }
    if "class_alignment" in m:
        out["class_accuracy"] = float(m["class_alignment"]["accuracy"])
    return out


# --------------------------------------------------------------------------- the frontier objective


@dataclass(frozen=True)
class Frontier:
    """Plain training's evaluated checkpoints and the matched quality Q: computed once, given to every trial."""

    run: str
    baseline: tuple[Checkpoint, ...]
    q: float


def baseline_config(cfg: MemshardConfig) -> MemshardConfig:
    """Plain training on the sweep's config: ``method=baseline`` (one model, nothing skipped) + ``sweep.baseline``."""
    from memshard.config import METHOD_SWITCHES

    raw = cfg.to_dict()
    raw["sweep"] = {}
    for key, value in METHOD_SWITCHES["baseline"].items():
        raw = set_dotted(raw, key, value)
    raw["method"] = "baseline"
    return load_config(raw, list(cfg.sweep.baseline))


def prepare_frontier(cfg: MemshardConfig, out: str) -> Frontier:
    """Train plain training (resuming what is there) and evaluate every checkpoint (reusing stored ones)."""
    from memshard.evaluation.evaluate import evaluate_rounds

    uri = cfg.sweep.baseline_run or posixpath.join(out, BASELINE_DIR)
    if not is_remote(uri):
        uri = os.path.abspath(uri)
    bcfg = baseline_config(cfg)
    manifest = RunDir(uri).manifest()
    if manifest is None or int(manifest.get("rounds_completed", 0)) < bcfg.train.rounds:
        console.print(f"[bold]frontier:[/bold] training plain training ({bcfg.train.rounds} rounds) in {uri}")
        train(bcfg, out=uri, resume=manifest is not None)
    metrics = evaluate_rounds(uri, eval_options(bcfg, cfg.sweep), "all")
    points = tuple(checkpoint_from_metrics("baseline", m) for m in metrics.values())
    q = matched_quality(points, cfg.sweep.matched_factor)
    best = min(points, key=lambda p: p.fid)
    console.print(
        f"frontier: plain training's best FID {best.fid:.2f} (round {best.round}), matched quality Q = {q:.2f}; "
        f"{len(points)} checkpoints"
    )
    return Frontier(run=uri, baseline=points, q=q)


def frontier_metrics(points: list[Checkpoint], frontier: Frontier) -> dict[str, Any]:
    """A trial's frontier report over its checkpoints so far (None as NaN: Tune's results are numbers)."""
    out = frontier_score(points, frontier.baseline, frontier.q)
    last = max(points, key=lambda p: p.round)
    out.update(last_fid=last.fid, last_memorized=last.memorized_fraction)
    return {k: (math.nan if v is None else float(v)) for k, v in out.items()}


def make_trainable(
    base: dict[str, Any], out: str, sweep: SweepConfig, frontier: Frontier | None = None
) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable: one full run per trial, one ``tune.report`` per committed round.

    With evaluation the last round's report waits for the evaluation and carries its figures,
    so every trial reports exactly ``train.rounds`` times (ASHA's budget axis) and a finished
    trial's last result holds everything results.csv needs. With a ``frontier`` every round is
    evaluated (the stored evaluations of earlier rounds are reused, so a retried trial scores
    the same) and its report carries the trial's frontier score so far. ``sweep`` is the
    sweep's own section (a trial's config has it emptied).
    """
    evaluate = sweep.evaluate and frontier is None

    def trial(params: dict[str, Any]) -> None:
        from ray import tune

        cfg = trial_config(base, params)
        run_uri = posixpath.join(out, TRIALS_DIR, tune.get_context().get_trial_id())
        resume = RunDir(run_uri).manifest() is not None  # a retried trial continues its own run
        last_reported = 0

        def on_round(summary: dict[str, Any]) -> None:
            nonlocal last_reported
            if evaluate and summary["round"] >= cfg.train.rounds:
                return  # reported below, with the evaluation
            report = round_metrics(summary)
            if frontier is not None:
                from memshard.evaluation.evaluate import evaluate_rounds

                r = int(summary["round"])
                ms = evaluate_rounds(run_uri, eval_options(cfg, sweep), list(range(1, r + 1)))
                report.update(frontier_metrics([checkpoint_from_metrics("trial", m) for m in ms.values()], frontier))
            tune.report(report)
            last_reported = int(summary["round"])

        outcome = train(cfg, out=run_uri, resume=resume, on_round=on_round)
        rounds = outcome.manifest["rounds"]
        if rounds and (evaluate or last_reported < outcome.rounds_completed):
            final = round_metrics(rounds[-1])
            if evaluate and outcome.complete:
                final.update(evaluate_trial(cfg, sweep, run_uri))
            tune.report(final)

    return trial


# --------------------------------------------------------------------------- results


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points no other point beats in both coordinates (both minimised); NaN rows are never optimal."""
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        mask[i] = not dominated.any()
    return mask


def pareto_axes(evaluated: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """((x column, direction), (y column, direction)) of the Pareto plot.

    With evaluation: FID and memorized fraction, both lower-is-better (quality vs copying).
    Without: skip rate (higher = more compute saved and fewer memorizing updates) vs loss (lower).
    """
    if evaluated:
        return ("fid", "min"), ("memorized_fraction", "min")
    return ("skip_rate", "max"), ("loss", "min")


def add_pareto(df: pd.DataFrame, evaluated: bool) -> pd.DataFrame:
    """Flag the Pareto-optimal trials among the *completed* ones.

    A trial ASHA stopped reports the figures of an earlier round; ranking them against finished
    trials would compare different amounts of training, so stopped and failed trials never count.
    """
    (xc, xd), (yc, yd) = pareto_axes(evaluated)
    if df.empty or xc not in df or yc not in df:
        df["pareto"] = False
        return df
    done = (df["status"] == "completed").to_numpy()
    x = np.where(done, pd.to_numeric(df[xc], errors="coerce").to_numpy(dtype=float), np.nan)
    y = np.where(done, pd.to_numeric(df[yc], errors="coerce").to_numpy(dtype=float), np.nan)
    df["pareto"] = pareto_mask(-x if xd == "max" else x, -y if yd == "max" else y)
    return df


def plot_pareto(df: pd.DataFrame, evaluated: bool, params: list[str]) -> bytes:
    """PNG: every trial as a point, the Pareto-optimal ones highlighted, joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (xc, xd), (yc, yd) = pareto_axes(evaluated)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if xc in df and yc in df:
        x = pd.to_numeric(df[xc], errors="coerce")
        y = pd.to_numeric(df[yc], errors="coerce")
        front = df["pareto"].astype(bool)
        done = (df["status"] == "completed") & ~front
        early = ~(df["status"] == "completed")
        ax.scatter(x[done], y[done], c="0.5", label="completed trial")
        if early.any():
            ax.scatter(x[early], y[early], c="0.75", marker="x", label="stopped early (its last round)")
        ax.scatter(x[front], y[front], c="tab:red", zorder=3, label="Pareto-optimal")
        order = np.argsort(x[front].to_numpy())
        ax.plot(x[front].to_numpy()[order], y[front].to_numpy()[order], c="tab:red", lw=1, zorder=2)
        _label_front(ax, df, x, y, front, params)
    better = {"min": "lower is better", "max": "higher is better"}
    ax.set_xlabel(f"{xc} ({better[xd]})")
    ax.set_ylabel(f"{yc} ({better[yd]})")
    ax.set_title(f"memshard sweep: {len(df)} trial(s)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _label_front(ax: Any, df: pd.DataFrame, x: pd.Series, y: pd.Series, front: pd.Series, params: list[str]) -> None:
    """Write each Pareto-optimal trial's swept values beside its point."""
    for i in np.flatnonzero(front.to_numpy()):
        values = ", ".join(f"{k.split('.')[-1]}={_short(df[k].iloc[i])}" for k in params if k in df)
        ax.annotate(values, (x.iloc[i], y.iloc[i]), fontsize=7, xytext=(4, 4), textcoords="offset points")


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def collect_results(grid: Any, cfg: MemshardConfig, out: str) -> pd.DataFrame:
    """One row per trial from Tune's ResultGrid and each trial's own manifest (the source of truth)."""
    keys = list(cfg.sweep.params)
    rows = []
    for res in grid:
        metrics = dict(res.metrics or {})
        trial_id = metrics.get("trial_id") or posixpath.basename(str(res.path).rstrip("/"))
        run_uri = posixpath.join(out, TRIALS_DIR, trial_id)
        manifest = RunDir(run_uri).manifest() or {}
        done = int(manifest.get("rounds_completed", 0))
        if res.error is not None:
            status = "error"
        elif done >= cfg.train.rounds:
            status = "completed"
        else:
            status = "stopped"  # by ASHA or the time budget
        row: dict[str, Any] = {"trial_id": trial_id, "status": status}
        for k in keys:
            row[k] = _plain((res.config or {}).get(k))
        row["rounds_completed"] = done
        for k in (*ROUND_KEYS, *EVAL_METRICS, *FRONTIER_KEYS, "copy_over_threshold", "class_accuracy"):
            if k in metrics:
                row[k] = metrics[k]
        row["run_dir"] = run_uri
        row["error"] = "" if res.error is None else str(res.error).strip().splitlines()[-1][:300]
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return add_pareto(df, _evaluated(cfg))


def _evaluated(cfg: MemshardConfig) -> bool:
    """Whether trials carry FID and memorized fraction (end-of-trial evaluation or the frontier)."""
    return cfg.sweep.evaluate or cfg.sweep.metric == "frontier"


def frontier_points(df: pd.DataFrame, cfg: MemshardConfig, frontier: Frontier) -> pd.DataFrame:
    """Every evaluated checkpoint: the baseline's, then each trial's (read back from the run directories)."""
    from memshard.evaluation.evaluate import stored_round

    rows = [{"arm": "baseline", **p.to_dict()} for p in frontier.baseline]
    opts = eval_options(cfg, cfg.sweep)
    for _, trial in df.iterrows():
        run = RunDir(str(trial["run_dir"]))
        for r in range(1, int(trial["rounds_completed"]) + 1):
            m = stored_round(run, EVAL_NAME, r, opts)
            if m is not None:
                rows.append({**checkpoint_from_metrics(str(trial["trial_id"]), m).to_dict()})
    return pd.DataFrame(rows)


def plot_frontier(df: pd.DataFrame, points: pd.DataFrame, frontier: Frontier, params: list[str]) -> bytes:
    """PNG: plain training's memorization-FID curve and Q, each trial's checkpoints and its matched point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    base = points[points["arm"] == "baseline"].sort_values("steps")
    ax.plot(base["fid"], base["memorized_fraction"], "-o", c="k", ms=4, lw=1.2, label="plain training (checkpoints)")
    ax.axvline(frontier.q, c="k", ls=":", lw=1, label=f"matched quality Q = {frontier.q:.2f}")
    trials = points[points["arm"] != "baseline"]
    if not trials.empty:
        ax.scatter(trials["fid"], trials["memorized_fraction"], c="0.8", s=10, label="trial checkpoints")
    if "fid" in df and "memorized_fraction" in df:
        reached = df.get("reached", pd.Series(0.0, index=df.index)).fillna(0).astype(float) > 0
        front = df["pareto"].astype(bool)
        ax.scatter(df["fid"][reached & ~front], df["memorized_fraction"][reached & ~front], c="tab:blue",
                   label="trial at Q (its lowest copying with FID <= Q)")  # fmt: skip
        ax.scatter(df["fid"][~reached], df["memorized_fraction"][~reached], c="tab:orange", marker="x",
                   label="trial that never reached Q (its best FID)")  # fmt: skip
        ax.scatter(df["fid"][front], df["memorized_fraction"][front], c="tab:red", zorder=3, label="Pareto-optimal")
        _label_front(ax, df, df["fid"], df["memorized_fraction"], front, params)
    ax.set_xlabel("FID (lower is better)")
    ax.set_ylabel("memorized fraction (lower is better)")
    ax.set_title(f"memshard sweep, frontier objective: {len(df)} trial(s)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return _png(fig)


# --------------------------------------------------------------------------- the sweep


def default_sweep_dir(cfg: MemshardConfig) -> str:
    return os.path.join("runs", f"{cfg.name}-sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def sweep_config(
    config_source: str | dict[str, Any],
    params: list[str] | None = None,
    overrides: list[str] | None = None,
    **sweep_options: Any,
) -> MemshardConfig:
    """The validated config of a sweep: CONFIG + ``--set`` overrides, its ``sweep:`` section, then
    ``--param`` spaces (a key given both ways takes the ``--param`` one) and options not None."""
    base = load_config(config_source, overrides)
    raw = base.to_dict()
    section = dict(raw.get("sweep") or {})
    section["params"] = dict(section.get("params") or {})
    for item in params or []:
        key, text = parse_param(item)
        section["params"][key] = text
    section.update({k: v for k, v in sweep_options.items() if v is not None})
    raw["sweep"] = section
    cfg = build_config(raw)
    if not cfg.sweep.params:
        raise ConfigError("nothing to sweep: give --param KEY=SPACE (e.g. agc.ratio=uniform(1.1,3)) or sweep.params")
    if cfg.sweep.scheduler == "asha" and cfg.sweep.grace_period > cfg.train.rounds:
        raise ConfigError(
            f"sweep.grace_period={cfg.sweep.grace_period} exceeds train.rounds={cfg.train.rounds}: "
            "ASHA could never stop a trial"
        )
    if cfg.sweep.metric == "frontier":
        baseline_config(cfg)  # its overrides are checked before any work
    return cfg


def make_scheduler(cfg: MemshardConfig) -> Any:
    """ASHA on the per-round metric (time axis = committed rounds), or None for plain FIFO."""
    from ray.tune.schedulers import ASHAScheduler

    sweep = cfg.sweep
    if sweep.scheduler != "asha":
        return None
    return ASHAScheduler(
        time_attr="round",
        max_t=cfg.train.rounds,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
    )


def build_tuner(cfg: MemshardConfig, out: str, verbose: int = 1, frontier: Frontier | None = None) -> Any:
    """The ``tune.Tuner`` of a sweep (current API: TuneConfig, RunConfig(storage_path), tune.report)."""
    from ray import tune

    sweep = cfg.sweep
    base = _absolute_paths(cfg.to_dict())
    trainable = tune.with_resources(
        make_trainable(base, out, sweep, frontier),
        resources=lambda spec: trial_resources(trial_config(base, dict(spec))),
    )
    # An end-of-trial metric (memorized_fraction / fid) is missing from the per-round reports, which
    # Tune refuses for TuneConfig.metric: such sweeps rank trials in results.csv instead.
    per_round = sweep.metric not in EVAL_METRICS
    if is_remote(out):
        storage_path, name = None, f"memshard-sweep-{posixpath.basename(out.rstrip('/'))}"
    else:
        storage_path, name = os.path.abspath(out), "tune"
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep.params),
        tune_config=tune.TuneConfig(
            metric=sweep.metric if per_round else None,
            mode=sweep.mode if per_round else None,
            scheduler=make_scheduler(cfg),
            num_samples=sweep.samples,
            max_concurrent_trials=sweep.max_concurrent,
            time_budget_s=sweep.time_budget_s,
            reuse_actors=False,  # each trial owns its actors and placement group
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=verbose,
        ),
    )


def best_trial(df: pd.DataFrame, cfg: MemshardConfig) -> pd.Series | None:
    """The best completed trial by sweep.metric / sweep.mode (stopped trials report earlier rounds)."""
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    if df.empty or metric not in df:
        return None
    values = pd.to_numeric(df[metric], errors="coerce").where(df["status"] == "completed")
    if values.notna().sum() == 0:
        return None
    return df.loc[values.idxmin() if mode == "min" else values.idxmax()]


def run_sweep(
    config_source: str | dict[str, Any],
    params: list[str] | None = None,
    samples: int | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
    *,
    metric: str | None = None,
    mode: str | None = None,
    scheduler: str | None = None,
    grace_period: int | None = None,
    max_concurrent: int | None = None,
    evaluate: bool | None = None,
    eval_num: int | None = None,
    time_budget_s: float | None = None,
    baseline: list[str] | None = None,
    baseline_run: str | None = None,
    reduction_factor: float | None = None,
    eval_steps: int | None = None,
    verbose: int = 1,
) -> pd.DataFrame:
    """Run a sweep; returns the results table (also written to DIR/results.csv, plot to DIR/pareto.png).

    Arguments left None keep the config's ``sweep:`` section (or its defaults). Everything is
    validated before Ray starts: a bad space, key or option raises :class:`ConfigError`, a sweep
    whose trials cannot fit the cluster :class:`~memshard.runtime.driver.RunError`.
    """
    cfg = sweep_config(
        config_source,
        params,
        overrides,
        samples=samples,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        grace_period=grace_period,
        max_concurrent=max_concurrent,
        evaluate=evaluate,
        eval_num=eval_num,
        time_budget_s=time_budget_s,
        baseline=baseline,
        baseline_run=baseline_run,
        reduction_factor=reduction_factor,
        eval_steps=eval_steps,
    )
    out = out or default_sweep_dir(cfg)
    if not is_remote(out):
        out = os.path.abspath(out)
    store = Storage(out)
    if store.exists(RESULTS_CSV) or store.listdir(TRIALS_DIR):
        raise RunError(f"sweep directory {out} already holds a sweep: pass another --out")
    connect(cfg)
    _check_fits(cfg)
    t0 = time.perf_counter()
    frontier = prepare_frontier(cfg, out) if cfg.sweep.metric == "frontier" else None
    grid = build_tuner(cfg, out, verbose=verbose, frontier=frontier).fit()
    df = collect_results(grid, cfg, out)
    store.write_text(RESULTS_CSV, df.to_csv(index=False))
    if frontier is not None:
        points = frontier_points(df, cfg, frontier)
        store.write_text(POINTS_CSV, points.to_csv(index=False))
        store.write_bytes(PARETO_PNG, plot_frontier(df, points, frontier, list(cfg.sweep.params)))
    else:
        store.write_bytes(PARETO_PNG, plot_pareto(df, cfg.sweep.evaluate, list(cfg.sweep.params)))
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    console.print(
        f"[bold green]sweep done[/bold green] in {time.perf_counter() - t0:.0f}s: {len(df)} trial(s) "
        f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'none'}); "
        f"results: {store.uri_of(RESULTS_CSV)}, Pareto plot: {store.uri_of(PARETO_PNG)}"
    )
    best = best_trial(df, cfg)
    if best is not None:
        values = ", ".join(f"{k}={_short(best[k])}" for k in cfg.sweep.params)
        value = best[cfg.sweep.metric]
        shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else value
        console.print(f"best by {cfg.sweep.metric} ({cfg.sweep.mode}): {best['trial_id']} {values} -> {shown}")
    return df
