"""The ``memshard`` command line.

    memshard train CONFIG [--set KEY=VALUE ...] [--out RUN] [--resume]
    memshard config show CONFIG [--set ...]
    memshard prepare SOURCE --out DATA.parquet [--size N] [--channels 1|3] [--limit N] [--duplicate D:M]
    memshard sample RUN [--num 64] [--steps 50] [--weights ema|raw] [--out grid.png]
    memshard sample RUN --prompt TEXT|--prompts-file F [--prss|--no-prss] [--lambda-ss X] [--out DIR]
    memshard calibrate-prss RUN [--quantile 0.95]   (PRSS thresholds from the run's own magnitudes)
    memshard serve RUN [--port 8000] [--lambda-ss X]  (HTTP endpoint with Ray Serve; PRSS floor server-side)
    memshard sweep CONFIG --param agc.ratio=uniform(1.1,3) [--samples N] [--out DIR]  (Ray Tune, ASHA)
    memshard compare CONFIG [--set ...] [--out DIR]   (method vs plain training: every checkpoint, matched quality)
    memshard evaluate RUN [--num 256] [--steps 50] [--weights ema|raw] [--name default] [--rounds all|1,4,8]
    memshard frontier BASELINE_RUN RUN [RUN ...] --out DIR [--names A,B,...]  (privacy at matched quality)
    memshard report RUN   (per-round table; skip-rate, skip-count and migration plots)

CONFIG is a YAML file or the name of a built-in preset (``memshard config presets``).
User errors (config, data, run directory) print one clear message and exit 2; they are
raised before any training starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .config import ConfigError, MemshardConfig, load_config, preset_names

if TYPE_CHECKING:
    from .evaluate import EvalOptions

# The baselines of memshard.mitigations (kept here so `--help` needs no torch import).
MITIGATION_NAMES = ("none", "random_token", "random_number", "repeat_words", "gaussian_noise", "wen")


def _config(args: argparse.Namespace) -> MemshardConfig:
    return load_config(args.config, args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from .driver import train

    cfg = _config(args)
    train(cfg, out=args.out, resume=args.resume)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(_config(args).to_yaml())
    return 0


def cmd_config_presets(_args: argparse.Namespace) -> int:
    print("\n".join(preset_names()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare
    from .data.prepare import parse_duplicate

    try:
        duplicate = parse_duplicate(args.duplicate) if args.duplicate else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    res = prepare(
        args.source,
        args.out,
        image_size=args.size,
        channels=args.channels,
        limit=args.limit,
        duplicate=duplicate,
        duplicate_seed=args.duplicate_seed,
    )
    dup = f", {res.duplicated_images} images stored {duplicate[1]} times" if duplicate else ""
    print(
        f"wrote {res.num_rows} rows ({res.image_size}x{res.image_size}, {res.channels} channel(s), "
        f"classes: {res.num_classes or 'none'}, captions: {'yes' if res.has_caption else 'no'}{dup}) to {res.path}"
    )
    return 0


def _is_t2i(run: str) -> bool:
    import json

    from .storage import Storage

    store = Storage(run)
    if not store.exists("served/model_index.json"):
        raise FileNotFoundError(f"{run}: no served model (RUN/served/model_index.json missing)")
    return json.loads(store.read_text("served/model_index.json")).get("_class_name") != "DDPMPipeline"


def cmd_sample_t2i(args: argparse.Namespace) -> int:
    from .checkpoint import RunDir
    from .config import build_config
    from .privacy import load_calibration
    from .t2i import SampleRequest, read_prompts, sample_run

    manifest = RunDir(args.run).manifest()
    prss = build_config(manifest["config"]).prss if manifest else None
    if prss is None:
        from .config import PRSSConfig

        prss = PRSSConfig()
    calibration = load_calibration(args.run)
    if calibration is not None and all(v is None for v in (args.lambda_ss, args.lambda_pr, args.tau)):
        # thresholds calibrated on this model (memshard calibrate-prss) beat the spec's SD-scale defaults
        prss = prss.model_copy(update={k: calibration[k] for k in ("lambda_ss", "lambda_pr", "tau")})
    updates = {
        "enabled": args.prss,
        "lambda_ss": args.lambda_ss,
        "lambda_pr": args.lambda_pr,
        "tau": args.tau,
        "mode": args.mode,
        "guidance_scale": args.guidance_scale,
        "candidates": args.candidates,
        "bank": args.bank,
        "num_candidates": args.num_candidates,
    }
    try:
        prss = prss.model_validate({**prss.model_dump(), **{k: v for k, v in updates.items() if v is not None}})
    except Exception as exc:
        raise ConfigError(f"PRSS options: {exc}") from None
    prompts, cand_lists = list(args.prompt or []), None
    if args.prompts_file:
        file_prompts, cand_lists = read_prompts(args.prompts_file)
        if args.prompt and cand_lists is not None:
            raise ConfigError("--prompt cannot be combined with a --prompts-file that has a candidates column")
        prompts += file_prompts
    req = SampleRequest(
        prompts=prompts,
        num_per_prompt=args.num_per_prompt,
        steps=args.steps,
        seed=args.seed,
        prss=prss,
        candidate_lists=cand_lists,
        mitigation=args.mitigation,
        weights=args.weights,
    )
    out = args.out or "samples"
    try:
        reports = sample_run(args.run, req, out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    trig = sum(r.get("triggered", False) for r in reports)
    print(f"wrote {len(reports)} images to {out}/images, {out}/grid.png and {out}/report.jsonl ({trig} triggered PRSS)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    df = run_sweep(
        args.config, args.param or [], args.samples, args.out, args.set or [],
        metric=args.metric, mode=args.mode, scheduler=args.scheduler, grace_period=args.grace_period,
        max_concurrent=args.max_concurrent, evaluate=args.evaluate, eval_num=args.eval_num,
        time_budget_s=args.time_budget_s,
    )  # fmt: skip
    return 0 if not df.empty and (df["status"] == "completed").any() else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeLimits, describe, serve_run

    if args.detach and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("--detach needs a running Ray cluster (RAY_ADDRESS): a local one dies with this process")
    limits = ServeLimits(
        max_images=args.max_images,
        max_steps=args.max_steps,
        default_steps=args.default_steps,
        max_body_bytes=args.max_body_bytes,
        max_batch_images=args.max_batch_images or max(16, args.max_images),
        batch_wait_s=args.batch_wait_ms / 1000,
        deadline_s=args.deadline_s,
        body_timeout_s=args.body_timeout_s,
        max_connections=args.max_connections,
        max_queued_images=args.max_queued_images,
    )
    serve_run(
        args.run, args.host, args.port, args.replicas, name=args.name, route_prefix=args.route_prefix,
        weights=args.weights, limits=limits, allow_no_prss=args.allow_no_prss, lambda_ss=args.lambda_ss,
        lambda_pr=args.lambda_pr, tau=args.tau, cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica, request_timeout_s=args.request_timeout_s,
        timeout_s=args.timeout_s, blocking=not args.detach,
        on_ready=lambda url, health: print(describe(url, health, args.run), flush=True),
    )  # fmt: skip
    return 0


def cmd_calibrate_prss(args: argparse.Namespace) -> int:
    from .privacy import calibrate_run

    out = calibrate_run(args.run, q=args.quantile, num_prompts=args.num_prompts, steps=args.steps, seed=args.seed)
    print(
        f"privacy level q={out['q']}: lambda_ss={out['lambda_ss']:.4g} lambda_pr={out['lambda_pr']:.4g} "
        f"tau={out['tau']:.4g} (from {out['reference']}); written to {args.run}/prss/calibration.json, "
        "used by `memshard sample` unless thresholds are given"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .sampling import ddim_sample, grid, load_served_unet, to_uint8

    if _is_t2i(args.run):
        return cmd_sample_t2i(args)
    if args.prompt or args.prompts_file:
        raise ConfigError(f"{args.run} serves an unconditional/class-conditional model: it takes no prompts")

    unet, sched, info = load_served_unet(args.run, args.weights)
    labels = None
    if unet.config.num_class_embeds:
        if args.label is not None:
            labels = torch.full((args.num,), args.label, dtype=torch.long)
        else:
            labels = torch.arange(args.num) % unet.config.num_class_embeds
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = ddim_sample(unet, sched, args.num, steps=args.steps, seed=args.seed, class_labels=labels, device=device)
    out = args.out or "samples.png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid(to_uint8(images), scale=args.scale).save(out)
    print(
        f"wrote {args.num} samples ({args.steps} DDIM steps, {args.weights} weights, round {info.get('round')}) "
        f"to {out}"
    )
    return 0


def _eval_options(args: argparse.Namespace, **extra: object) -> EvalOptions:
    """EvalOptions from the evaluation flags shared by evaluate, frontier and compare."""
    from .evaluate import SETTINGS_KEYS, EvalOptions

    kw = {key: getattr(args, key) for key in (*SETTINGS_KEYS, "name") if getattr(args, key, None) is not None}
    return EvalOptions(**{**kw, **extra})


def _connect_for(run: str) -> None:
    from .checkpoint import RunDir
    from .config import build_config
    from .driver import connect

    manifest = RunDir(run).manifest()
    if manifest is None:
        raise FileNotFoundError(f"{run}: no run (run.json missing)")
    connect(build_config(manifest["config"]))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import ray

    from .evaluate import evaluate, evaluate_rounds, round_eval_dir, summary_lines

    if args.rounds is not None and args.round is not None:
        raise ConfigError("give --round R (one round, into RUN/eval/NAME/) or --rounds LIST (each into round-XXXX/)")
    _connect_for(args.run)
    opts = _eval_options(args, round=args.round)
    try:
        if args.rounds is not None:
            results = evaluate_rounds(args.run, opts, args.rounds)
        else:
            results = {None: evaluate(args.run, opts)}
    finally:
        ray.shutdown()
    for r, metrics in results.items():
        if r is not None:
            print(f"round {r} ({metrics['train_steps']} steps):")
        print("\n".join(("  " if r is not None else "") + line for line in summary_lines(metrics)))
    where = f"eval/{args.name}/" if args.rounds is None else f"{round_eval_dir(args.name, 0)[:-4]}XXXX/"
    print(f"wrote {args.run}/{where} (metrics.json, samples.png, most_copied.png, per_sample.parquet)")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    import ray

    from .frontier import frontier, matched_table, points_table

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    _connect_for(args.baseline)
    try:
        result = frontier(args.baseline, args.runs, args.out, _eval_options(args), names, args.factor)
    finally:
        ray.shutdown()
    print(points_table(result))
    print()
    print(matched_table(result))
    print(f"wrote {args.out}/frontier.csv, matched.json, frontier.png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .driver import default_run_dir

    cfg = _config(args)
    out = args.out or default_run_dir(cfg)
    compare(cfg, out, _eval_options(args), max_factor=args.max_factor)
    print(f"runs, comparison.md and frontier/ (frontier.csv, matched.json, frontier.png) in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .progress import console
    from .report import report

    tab, written = report(args.run)
    console.print(tab)
    for path in written:
        console.print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memshard", description="Memorization-safe diffusion training on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def add_eval_args(sp: argparse.ArgumentParser) -> None:
        from .metrics.dedupe import DEDUPE_MODES, NEAR_THRESHOLD

        sp.add_argument("--num", type=int, default=256, help="samples to generate (per round)")
        sp.add_argument(
            "--fid-num",
            type=int,
            help="of those, how many get Inception features for FID and copy similarity (default all; the 1/3 rule "
            "uses all: on a CPU the features are most of an evaluation's cost)",
        )
        sp.add_argument("--steps", type=int, default=50, help="DDIM steps (eta 0)")
        sp.add_argument("--weights", choices=("ema", "raw"), default="ema")
        sp.add_argument("--name", default="default", help="results go to RUN/eval/NAME/")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--fid-reference", type=int, help="training images for FID/copy similarity (default all)")
        sp.add_argument("--calibration-images", type=int, default=256, help="distinct images for the copy threshold")
        sp.add_argument("--extractor", help="TorchScript feature extractor (e.g. SSCD); default Inception pool3")
        sp.add_argument(
            "--dedupe",
            choices=DEDUPE_MODES,
            default="exact",
            help="group identical training images before neighbour metrics: exact pixels (default), near "
            "(RMS distance under --dedupe-threshold), none (every row its own neighbour)",
        )
        sp.add_argument(
            "--dedupe-threshold",
            type=float,
            help=f"near mode: RMS pixel distance in [0, 1] (default {NEAR_THRESHOLD:g})",
        )

    def add_config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help=f"YAML file or preset ({', '.join(preset_names())})")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")

    t = sub.add_parser("train", help="train with IET-AGC over shards on Ray")
    add_config_args(t)
    t.add_argument("--out", help="run directory (local path or s3://); default runs/<name>-<time>")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last committed round")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the fully resolved config")
    add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    csub.add_parser("presets", help="list built-in presets").set_defaults(func=cmd_config_presets)

    pr = sub.add_parser("prepare", help="convert images into the canonical Parquet dataset")
    pr.add_argument("source", help="digits | fashion-mnist | an image folder | a .npy/.npz file")
    pr.add_argument("--out", required=True, help="output Parquet path (local or s3://)")
    pr.add_argument("--size", type=int, help="image size (default: the source's)")
    pr.add_argument("--channels", type=int, choices=(1, 3))
    pr.add_argument("--limit", type=int, help="keep only the first N images")
    pr.add_argument(
        "--duplicate",
        metavar="D:M",
        help="store D seeded-chosen images M times each (extra rows, new ids): data where memorization happens",
    )
    pr.add_argument("--duplicate-seed", type=int, default=0, help="which images --duplicate picks")
    pr.set_defaults(func=cmd_prepare)

    s = sub.add_parser("sample", help="sample a grid from a run's served model (DDIM)")
    s.add_argument("run", help="run directory")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--weights", choices=("ema", "raw"), default="ema")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, help="class label for every sample (class-conditional models)")
    s.add_argument("--scale", type=int, default=4, help="pixel upscaling of the grid")
    s.add_argument("--out", help="output PNG (default samples.png); text-to-image: output directory (samples/)")
    t2i = s.add_argument_group("text-to-image runs (PRSS on by default; defaults from the run's prss config)")
    t2i.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    t2i.add_argument("--prompts-file", help="prompts: text file (one a line) or Parquet (prompt[, candidates])")
    t2i.add_argument("--num-per-prompt", type=int, default=1)
    t2i.add_argument("--prss", action=argparse.BooleanOptionalAction, default=None, help="PRSS on/off")
    t2i.add_argument("--lambda-ss", type=float, help="trigger/search threshold (lower = more private)")
    t2i.add_argument("--lambda-pr", type=float, help="per-step re-anchoring threshold")
    t2i.add_argument("--tau", type=float, help="m_t of full re-anchoring")
    t2i.add_argument("--mode", choices=("prss", "pr", "ss"))
    t2i.add_argument("--guidance-scale", type=float)
    t2i.add_argument("--candidates", choices=("perturb", "bank", "list"))
    t2i.add_argument("--bank", help="prompt bank file for --candidates bank")
    t2i.add_argument("--num-candidates", type=int)
    t2i.add_argument(
        "--mitigation",
        choices=MITIGATION_NAMES,
        help="a baseline instead of PRSS",
    )
    s.set_defaults(func=cmd_sample)

    sw = sub.add_parser("sweep", help="Ray Tune sweep, each trial a full run; results.csv + pareto.png")
    add_config_args(sw)
    sw.add_argument(
        "--param",
        action="append",
        metavar="KEY=SPACE",
        help="uniform(a,b) | loguniform(a,b) | choice(v,...) | randint(a,b) (b excluded) | grid(v,...); repeatable",
    )
    sw.add_argument("--samples", type=int)
    sw.add_argument("--out", help="sweep directory (local or s3://); default runs/<name>-sweep-<time>")
    sw.add_argument("--metric", choices=("loss", "skip_rate", "memorized_fraction", "fid"))
    sw.add_argument("--mode", choices=("min", "max"))
    sw.add_argument("--scheduler", choices=("asha", "fifo"))
    sw.add_argument("--grace-period", type=int)
    sw.add_argument("--max-concurrent", type=int)
    sw.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None)
    sw.add_argument("--eval-num", type=int)
    sw.add_argument("--time-budget", type=float, dest="time_budget_s")
    sw.set_defaults(func=cmd_sweep)

    sv = sub.add_parser("serve", help="serve RUN's model over HTTP with Ray Serve (PRSS on for text-to-image)")
    sv.add_argument("run", help="run directory (local or s3://)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--name", default="memshard")
    sv.add_argument("--route-prefix", default="/")
    sv.add_argument("--weights", choices=("ema", "raw"), default="ema")
    sv.add_argument("--cpus-per-replica", type=float, default=1.0)
    sv.add_argument("--gpus-per-replica", type=float)
    sv.add_argument("--lambda-ss", type=float, help="server floor (requests may only go lower = more private)")
    sv.add_argument("--lambda-pr", type=float)
    sv.add_argument("--tau", type=float)
    sv.add_argument("--allow-no-prss", action="store_true", help="let requests turn PRSS off")
    sv.add_argument("--max-images", type=int, default=8, help="images per request")
    sv.add_argument("--max-steps", type=int, default=100)
    sv.add_argument("--default-steps", type=int, default=50)
    sv.add_argument("--max-body-bytes", type=int, default=65536)
    sv.add_argument("--max-batch-images", type=int, help="images per batched call (default max(16, --max-images))")
    sv.add_argument("--batch-wait-ms", type=float, default=50.0)
    sv.add_argument(
        "--deadline-s",
        type=float,
        default=60.0,
        help="answer each request within this or refuse it (503 + Retry-After)",
    )
    sv.add_argument("--body-timeout-s", type=float, default=10.0, help="a request body must arrive within this (408)")
    sv.add_argument("--max-connections", type=int, default=256, help="requests one replica holds at once")
    sv.add_argument("--max-queued-images", type=int, default=256, help="images admitted and not yet generated")
    sv.add_argument(
        "--request-timeout-s", type=float, help="Serve's end-to-end timeout (default: deadline + body timeout + 10 s)"
    )
    sv.add_argument("--timeout-s", type=float, default=600.0, help="wait this long for the deployment to start")
    sv.add_argument("--detach", action="store_true", help="return once deployed (needs RAY_ADDRESS)")
    sv.set_defaults(func=cmd_serve)

    cal = sub.add_parser("calibrate-prss", help="set a text-to-image run's PRSS thresholds from its own magnitudes")
    cal.add_argument("run", help="run directory")
    cal.add_argument("--quantile", type=float, default=0.95, help="privacy level q: about 1-q of captions trigger")
    cal.add_argument("--num-prompts", type=int, default=64, help="training captions sampled for the reference")
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(func=cmd_calibrate_prss)

    e = sub.add_parser("evaluate", help="memorization, copy similarity, FID (and class alignment) of a run")
    e.add_argument("run", help="run directory")
    add_eval_args(e)
    e.add_argument("--round", type=int, help="evaluate the weights committed after this round (default: served)")
    e.add_argument(
        "--rounds",
        help="`all` or a comma list of rounds: each round's global weights into RUN/eval/NAME/round-XXXX/ "
        "(same generations for every round; rounds already evaluated with the same settings are reused)",
    )
    e.set_defaults(func=cmd_evaluate)

    fr = sub.add_parser(
        "frontier",
        help="memorization against FID over training for plain training and other arms; privacy at matched quality",
    )
    fr.add_argument("baseline", help="the plain-training run (its checkpoints are the early-stopping frontier)")
    fr.add_argument("runs", nargs="+", help="the runs to compare with it (the same training images)")
    fr.add_argument("--out", required=True, help="directory for frontier.csv, matched.json, frontier.png")
    fr.add_argument("--names", help="comma list of arm names, baseline first (default: each run's method)")
    fr.add_argument("--factor", type=float, default=1.05, help="matched quality Q = FACTOR x the baseline's best FID")
    add_eval_args(fr)
    fr.set_defaults(func=cmd_frontier)

    rp = sub.add_parser("report", help="per-round table and plots (skip rates, skip counts, migrations) of a run")
    rp.add_argument("run", help="run directory (local or s3://)")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser(
        "compare", help="train CONFIG and plain training (same steps), evaluate every checkpoint of both, compare"
    )
    add_config_args(cp)
    cp.add_argument("--out", help="directory for both runs, comparison.md and frontier/ (local)")
    cp.add_argument(
        "--max-factor",
        type=float,
        default=1.0,
        help="if CONFIG has not reached plain training's quality at equal steps, train it on (a round at a time) "
        "up to this x the steps, stopping at the first checkpoint that does (default 1: equal steps only)",
    )
    add_eval_args(cp)
    cp.set_defaults(num=128, fid_reference=512, calibration_images=128)
    cp.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import WeightsError
    from .data import DataError
    from .driver import RunError
    from .frontier import FrontierError

    try:
        return args.func(args)
    except (ConfigError, DataError, RunError, WeightsError, FrontierError, FileNotFoundError) as exc:
        print(f"memshard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
