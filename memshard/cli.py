"""The ``memshard`` command line.

    memshard train CONFIG [--set KEY=VALUE ...] [--out RUN] [--resume]
    memshard config show CONFIG [--set ...]
    memshard prepare SOURCE --out DATA.parquet [--size N] [--channels 1|3] [--limit N] [--duplicate D:M]
    memshard sample RUN [--num 64] [--steps 50] [--weights ema|raw] [--out grid.png]
    memshard sample RUN --prompt TEXT|--prompts-file F [--prss|--no-prss] [--lambda-ss X] [--out DIR]
    memshard calibrate-prss RUN [--defend 0.9]   (PRSS thresholds from the run's own magnitudes)
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
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import ValidationError

from memshard import __version__
from memshard.config import PRESET_DIR, ConfigError, MemshardConfig, PRSSConfig, load_config, preset_names

if TYPE_CHECKING:
    from memshard.evaluation.evaluate import EvalOptions

# The baselines of memshard.prss.mitigations (kept here so `--help` needs no torch import).
MITIGATION_NAMES = ("none", "random_token", "random_number", "repeat_words", "gaussian_noise", "wen")


def _at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number >= ``minimum``, refused at parse time with the bound (before any work)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g} (got {text})")
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


WEIGHTS_HELP = "ema: the EMA weights (what is served); raw: the averaged proxies' own weights"
POSITIVE = _at_least(1)  # counts: images, steps, prompts, samples
NON_NEGATIVE = _at_least(0)
POSITIVE_FLOAT = _at_least(1e-9, float)
NON_NEGATIVE_FLOAT = _at_least(0.0, float)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help`` (unless its help already says it); line breaks kept."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class _SubParser(argparse.ArgumentParser):
    """Subcommands show their defaults in --help too."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def preset_summary(name: str) -> str:
    """The first sentence of a preset's leading comment: what ``config presets`` lists."""
    lines = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    cut = text.find(". ")
    return text[: cut + 1] if cut > 0 else text


def writable(path: str, *, directory: bool = False, flag: str = "--out") -> str:
    """``path`` if it can be written (as a file, or a folder with ``directory``), else a clear error naming ``flag``.

    Checked before any work, so that an hour of sampling does not end in a traceback; nothing is
    created here (a command refused later leaves nothing behind): missing folders are made when
    the output is written. Remote (``s3://``) paths are left to the storage layer.
    """
    if "://" in path:
        return path
    full = os.path.abspath(os.path.expanduser(path))
    reason, where = None, None
    if directory and os.path.exists(full) and not os.path.isdir(full):
        reason = "it is a file, not a directory"
    elif not directory and os.path.isdir(full):
        reason = "it is a directory"
    else:
        ancestor = full if directory else os.path.dirname(full)
        while not os.path.exists(ancestor):  # the nearest part of the path that exists decides
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            reason, where = "a file stands where a folder of it should be", ancestor
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            reason, where = "permission denied", ancestor
    if reason is not None:
        raise ConfigError(f"cannot write {path}: {reason}{f' ({where})' if where else ''}; choose another {flag}")
    return path


def _config(args: argparse.Namespace) -> MemshardConfig:
    return load_config(args.config, args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from memshard.runtime.driver import resolve_run_dir, train

    cfg = _config(args)
    out = resolve_run_dir(cfg, args.out, args.resume)  # decided here too, so that Ctrl-C can name it
    try:
        train(cfg, out=out, resume=args.resume)
    except KeyboardInterrupt:
        import ray

        if ray.is_initialized():  # stop Ray's log forwarding first: its "task failed ... retried" lines are noise here
            ray.shutdown()
        print(interrupted_message(args, out), file=sys.stderr)
        return 130
    return 0


def interrupted_message(args: argparse.Namespace, out: str | None) -> str:
    """What Ctrl-C during training kept, and the command that continues it."""
    from memshard.io.rundir import RunDir

    manifest = None
    if out is not None:
        try:
            manifest = RunDir(out).manifest()
        except Exception:  # an unreadable run directory: say nothing was kept
            manifest = None
    if manifest is None:
        return "memshard: interrupted before the run was created; nothing was kept"
    n = int(manifest.get("rounds_completed", 0))
    kept = f"rounds 1..{n} kept" if n else "no round committed yet (the data and initial weights are kept)"
    sets = "".join(f" --set {kv}" for kv in args.set or [])
    return (f"memshard: interrupted after round {n}; {kept} in {out}; continue with:\n"
            f"  memshard train {args.config}{sets} --out {out} --resume")  # fmt: skip


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(_config(args).to_yaml(describe=args.describe))
    return 0


def cmd_config_presets(_args: argparse.Namespace) -> int:
    names = preset_names()
    width = max(map(len, names))
    print("\n".join(f"{name:<{width}}  {preset_summary(name)}" for name in names))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from memshard.data import prepare
    from memshard.data.prepare import parse_duplicate

    try:
        duplicate = parse_duplicate(args.duplicate) if args.duplicate else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    writable(args.out)
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
    if res.upscaled:
        print(f"note: {res.upscaled} image(s) were smaller than {res.image_size}x{res.image_size} and were enlarged "
              "(blurred); --size sets the size")  # fmt: skip
    if res.cropped:
        print(f"note: {res.cropped} image(s) were not square and were centre-cropped")
    return 0


def _is_t2i(run: str) -> bool:
    import json

    from memshard.io.storage import Storage

    store = Storage(run)
    if not store.exists("served/model_index.json"):
        raise FileNotFoundError(f"{run}: no served model (RUN/served/model_index.json missing)")
    return json.loads(store.read_text("served/model_index.json")).get("_class_name") != "DDPMPipeline"


PRSS_FLAGS = {"enabled": "--prss", "lambda_ss": "--lambda-ss", "lambda_pr": "--lambda-pr", "tau": "--tau",
              "mode": "--prss-mode", "guidance_scale": "--guidance-scale", "candidates": "--candidates",
              "bank": "--bank", "num_candidates": "--num-candidates", "detect_step": "--detect-step",
              "restart": "--restart"}  # fmt: skip
# options of text-to-image sampling, by argparse dest: refused on other runs rather than ignored
T2I_ONLY = {"prompt": "--prompt", "prompts_file": "--prompts-file", "prss": "--prss/--no-prss",
            **{k: v for k, v in PRSS_FLAGS.items() if k != "enabled"}, "mitigation": "--mitigation"}  # fmt: skip


def _prss_error(exc: ValidationError, base: PRSSConfig) -> str:
    """One line naming the options and the rule they break (not pydantic's dump with its URL)."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err.get("loc") else ""
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if field:
        return f"{PRSS_FLAGS.get(field, field)}: {msg}"
    if "prss.bank" in msg:
        return "--candidates bank needs --bank FILE (a prompt bank: one prompt a line, or Parquet with `prompt`)"
    if "tau" in msg:  # the model-level rule: tau > lambda_pr
        return (f"--tau must exceed --lambda-pr (re-anchoring reaches full strength at tau; the run's values are "
                f"lambda_pr={base.lambda_pr:g}, tau={base.tau:g} where not given)")  # fmt: skip
    return msg


def cmd_sample_t2i(args: argparse.Namespace) -> int:
    from memshard.config import build_config
    from memshard.io.rundir import RunDir
    from memshard.prss.calibration import calibration_detection, load_calibration, scale_detect_step
    from memshard.prss.sample import SampleRequest, read_prompts, sample_run

    manifest = RunDir(args.run).manifest()
    prss = build_config(manifest["config"]).prss if manifest else None
    if prss is None:
        prss = PRSSConfig()
    calibration = load_calibration(args.run)
    if calibration is not None and all(v is None for v in (args.lambda_ss, args.lambda_pr, args.tau)):
        # thresholds calibrated on this model (memshard calibrate-prss) beat the spec's SD-scale defaults;
        # lambda_ss comes with the step it was calibrated at
        prss = prss.model_copy(
            update={**{k: calibration[k] for k in ("lambda_ss", "lambda_pr", "tau")},
                    "pr_profile": calibration.get("pr_profile"), **calibration_detection(calibration)}
        )  # fmt: skip
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
        "detect_step": args.detect_step,
        "restart": args.restart,
    }
    try:
        prss = prss.model_validate({**prss.model_dump(), **{k: v for k, v in updates.items() if v is not None}})
    except ValidationError as exc:
        raise ConfigError(f"PRSS options: {_prss_error(exc, prss)}") from None
    if args.detect_step is not None:  # a step of this sampler's own count
        prss = prss.model_copy(update={"detect_reference_steps": None})
    elif prss.detect_reference_steps is not None:
        # a detection step chosen for another step count (the calibration's, or the run config's
        # prss.detect_reference_steps): the same share of this sampler's trajectory, as the server does
        prss = prss.model_copy(
            update={"detect_step": scale_detect_step(prss.detect_step, prss.detect_reference_steps, args.steps),
                    "detect_reference_steps": None}
        )  # fmt: skip
    if prss.enabled and prss.detect_step > args.steps:
        raise ConfigError(f"--detect-step {prss.detect_step}: past the last of --steps {args.steps}")
    out = writable(args.out or "samples", directory=True)
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
    try:
        reports = sample_run(args.run, req, out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    trig = sum(r.get("triggered", False) for r in reports)
    print(f"wrote {len(reports)} images to {out}/images, {out}/grid.png and {out}/report.jsonl ({trig} triggered PRSS)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from memshard.sweep import run_sweep

    df = run_sweep(
        args.config, args.param or [], args.samples, args.out, args.set or [],
        metric=args.metric, mode=args.mode, scheduler=args.scheduler, grace_period=args.grace_period,
        max_concurrent=args.max_concurrent, evaluate=args.evaluate, eval_num=args.eval_num,
        time_budget_s=args.time_budget_s, baseline=args.baseline, baseline_run=args.baseline_run,
    )  # fmt: skip
    return 0 if not df.empty and (df["status"] == "completed").any() else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from memshard.serving.app import describe, serve_run
    from memshard.serving.requests import ServeLimits

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
    from memshard.prss.calibration import calibrate_run

    if args.quantile is not None and args.defend is not None:
        raise ConfigError("--quantile and --defend are two ways to state one level: give one")
    for flag, v in (("--defend", args.defend), ("--quantile", args.quantile)):
        if v is not None and not 0 < v < 1:
            raise ConfigError(f"{flag} {v:g}: a privacy level is a share, strictly between 0 and 1")
    if args.detect_step is not None and args.detect_step > args.steps:
        raise ConfigError(f"--detect-step {args.detect_step}: past the last of --steps {args.steps}")
    out = calibrate_run(
        args.run, q=args.quantile, defend=args.defend, num_prompts=args.num_prompts, steps=args.steps, seed=args.seed,
        detect_step=args.detect_step, per_step=not args.flat_pr,
    )  # fmt: skip
    if "defend" in out:
        what = (
            f"defend {out['defend']:.0%} of the duplicated captions ({out['memorized_triggered']:.0%} of them trigger"
            + (f", {out['heldout_triggered']:.0%} of once-seen captions" if "heldout_triggered" in out else "")
            + ")"
        )
    else:
        what = f"quantile q={out['q']}"
    print(
        f"privacy level: {what}: lambda_ss={out['lambda_ss']:.4g} lambda_pr={out['lambda_pr']:.4g} "
        f"tau={out['tau']:.4g}"
        + (
            f" (x{min(out['pr_profile']):.2g} to x{max(out['pr_profile']):.2g} along the trajectory)"
            if out.get("pr_profile")
            else ""
        )
        + f", detection at step {out['detect_step']} of {out['steps']}"
        + (f" (AUC {out['detect_auc']:.3f}; step 1: {out['auc_by_step'][0]:.3f})" if "detect_auc" in out else "")
        + f" (from {out['reference']}); written to {args.run}/prss/calibration.json, "
        "used by `memshard sample` unless thresholds are given"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from memshard.models.sampling import ddim_sample, grid, load_served_unet, to_uint8

    if _is_t2i(args.run):
        return cmd_sample_t2i(args)
    given = [flag for dest, flag in T2I_ONLY.items() if getattr(args, dest, None) is not None]
    if given:  # never ignore a privacy option silently
        raise ConfigError(
            f"{args.run} serves an unconditional/class-conditional model: {', '.join(given)} "
            "apply to text-to-image runs only"
        )

    out = writable(args.out or "samples.png")
    unet, sched, info = load_served_unet(args.run, args.weights)
    labels = None
    if unet.config.num_class_embeds:
        if args.label is not None:
            labels = torch.full((args.num,), args.label, dtype=torch.long)
        else:
            labels = torch.arange(args.num) % unet.config.num_class_embeds
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = ddim_sample(unet, sched, args.num, steps=args.steps, seed=args.seed, class_labels=labels, device=device)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid(to_uint8(images), scale=args.scale).save(out)
    print(
        f"wrote {args.num} samples ({args.steps} DDIM steps, {args.weights} weights, round {info.get('round')}) "
        f"to {out}"
    )
    return 0


def _eval_options(args: argparse.Namespace, **extra: object) -> EvalOptions:
    """EvalOptions from the evaluation flags shared by evaluate, frontier and compare."""
    from memshard.evaluation.evaluate import SETTINGS_KEYS, EvalOptions

    kw = {key: getattr(args, key) for key in (*SETTINGS_KEYS, "name") if getattr(args, key, None) is not None}
    return EvalOptions(**{**kw, **extra})


def _connect_for(run: str) -> None:
    from memshard.config import build_config
    from memshard.io.rundir import RunDir
    from memshard.runtime.driver import connect

    manifest = RunDir(run).manifest()
    if manifest is None:
        raise FileNotFoundError(f"{run}: no run (run.json missing)")
    connect(build_config(manifest["config"]))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import ray

    from memshard.evaluation.evaluate import evaluate, evaluate_rounds, round_eval_dir, summary_lines

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

    from memshard.evaluation.frontier import frontier, matched_table, points_table

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
    from memshard.evaluation.compare import compare
    from memshard.runtime.driver import default_run_dir

    cfg = _config(args)
    out = args.out or default_run_dir(cfg)
    compare(cfg, out, _eval_options(args), max_factor=args.max_factor)
    print(f"runs, comparison.md and frontier/ (frontier.csv, matched.json, frontier.png) in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from memshard.evaluation.report import report
    from memshard.runtime.progress import console

    tab, written = report(args.run)
    # Rich lays a table out to the terminal's width (80 columns when piped) and cuts values with
    # "...": a report is read for its numbers, so it gets the width it needs.
    from rich.console import Console

    need = Console(width=100_000).measure(tab).maximum  # measured unconstrained: console.measure caps at its width
    if console.width < need:
        Console(width=need, highlight=False).print(tab)
    else:
        console.print(tab)
    for path in written:
        console.print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memshard", description="Memorization-safe diffusion training on Ray.", formatter_class=_HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"memshard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubParser)

    def add_eval_args(sp: argparse.ArgumentParser) -> None:
        from memshard.evaluation.metrics.dedupe import DEDUPE_MODES, NEAR_THRESHOLD

        sp.add_argument("--num", type=POSITIVE, default=256, help="samples to generate (per round)")
        sp.add_argument(
            "--fid-num",
            type=POSITIVE,
            help="of those, how many get Inception features for FID and copy similarity (default all; the 1/3 rule "
            "uses all: on a CPU the features are most of an evaluation's cost)",
        )
        sp.add_argument("--steps", type=POSITIVE, default=50, help="DDIM steps (eta 0)")
        sp.add_argument("--weights", choices=("ema", "raw"), default="ema", help=WEIGHTS_HELP)
        sp.add_argument("--name", default="default", help="results go to RUN/eval/NAME/")
        sp.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the generations' noise")
        sp.add_argument("--fid-reference", type=POSITIVE, help="training images for FID/copy similarity (default all)")
        sp.add_argument(
            "--calibration-images", type=POSITIVE, default=256, help="distinct images for the copy threshold"
        )
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
            type=NON_NEGATIVE_FLOAT,
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
    show.add_argument("--describe", action="store_true", help="each key's description as a comment beside it")
    show.set_defaults(func=cmd_config_show)
    csub.add_parser("presets", help="list built-in presets").set_defaults(func=cmd_config_presets)

    pr = sub.add_parser("prepare", help="convert images into the canonical Parquet dataset")
    pr.add_argument(
        "source",
        help="digits | fashion-mnist | emoji (the captioned set scripts/setup.sh fetches) | shapes (a synthetic "
        "captioned set whose captions compose, drawn at prepare time) | an image folder | "
        "a .npy/.npz file | a .parquet file (an image column of encoded bytes; label/caption columns kept)",
    )
    pr.add_argument("--out", required=True, help="output Parquet path (local or s3://)")
    pr.add_argument("--size", type=POSITIVE, help="image size (default: the source's)")
    pr.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: the source's")
    pr.add_argument("--limit", type=POSITIVE, help="keep only the first N images")
    pr.add_argument(
        "--duplicate",
        metavar="D:M",
        help="store D seeded-chosen images M times each (extra rows, new ids): data where memorization happens",
    )
    pr.add_argument("--duplicate-seed", type=NON_NEGATIVE, default=0, help="which images --duplicate picks")
    pr.set_defaults(func=cmd_prepare)

    s = sub.add_parser("sample", help="sample a grid from a run's served model (DDIM)")
    s.add_argument("run", help="run directory")
    s.add_argument("--num", type=POSITIVE, default=64, help="samples (unconditional / class-conditional runs)")
    s.add_argument("--steps", type=POSITIVE, default=50, help="DDIM steps (eta 0)")
    s.add_argument("--weights", choices=("ema", "raw"), default="ema", help=WEIGHTS_HELP)
    s.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the noise (image i: seed*1000003+i)")
    s.add_argument("--label", type=NON_NEGATIVE, help="class label for every sample (class-conditional models)")
    s.add_argument("--scale", type=POSITIVE, default=4, help="pixel upscaling of the grid")
    s.add_argument("--out", help="output PNG (default samples.png); text-to-image: output directory (samples/)")
    t2i = s.add_argument_group("text-to-image runs (PRSS on by default; defaults from the run's prss config)")
    t2i.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    t2i.add_argument("--prompts-file", help="prompts: text file (one a line) or Parquet (prompt[, candidates])")
    t2i.add_argument("--num-per-prompt", type=POSITIVE, default=1, help="images per prompt")
    t2i.add_argument("--prss", action=argparse.BooleanOptionalAction, default=None, help="PRSS on/off")
    t2i.add_argument("--lambda-ss", type=POSITIVE_FLOAT, help="trigger/search threshold (lower = more private)")
    t2i.add_argument("--lambda-pr", type=POSITIVE_FLOAT, help="per-step re-anchoring threshold")
    t2i.add_argument("--tau", type=POSITIVE_FLOAT, help="m_t of full re-anchoring (must exceed --lambda-pr)")
    t2i.add_argument(
        "--prss-mode",
        dest="mode",
        choices=("prss", "pr", "ss"),
        help="prss: re-anchoring and search; pr: re-anchoring only; ss: search only (default: the run's)",
    )
    t2i.add_argument("--guidance-scale", type=_at_least(1.0, float), help="CFG scale (default: the run's)")
    t2i.add_argument(
        "--candidates", choices=("perturb", "bank", "list"), help="where search prompts come from (default: the run's)"
    )
    t2i.add_argument("--bank", help="prompt bank file for --candidates bank")
    t2i.add_argument("--num-candidates", type=POSITIVE, help="prompts scored per triggered prompt")
    t2i.add_argument(
        "--detect-step", type=POSITIVE, help="sampling step whose magnitude triggers PRSS (default: the calibration's, "
        "else the run's, 1 = the spec's first step)",
    )  # fmt: skip
    t2i.add_argument(
        "--restart", action=argparse.BooleanOptionalAction, default=None,
        help="on a trigger after step 1, sample the image again from its noise with the chosen prompt",
    )  # fmt: skip
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
    sw.add_argument("--samples", type=POSITIVE, help="trials (default: the config's sweep.samples)")
    sw.add_argument("--out", help="sweep directory (local or s3://); default runs/<name>-sweep-<time>")
    sw.add_argument(
        "--metric",
        choices=("loss", "skip_rate", "memorized_fraction", "fid", "frontier"),
        help="what the trials are ranked by (default: the config's sweep.metric); frontier: memorized fraction at "
        "matched quality against plain training stopped early, every round evaluated",
    )
    sw.add_argument(
        "--baseline",
        action="append",
        metavar="KEY=VALUE",
        help="frontier: an override of the plain-training run whose checkpoints are the frontier; repeatable",
    )
    sw.add_argument("--baseline-run", help="frontier: reuse this plain-training run directory (trained on as needed)")
    sw.add_argument("--mode", choices=("min", "max"), help="whether --metric is minimised or maximised")
    sw.add_argument("--scheduler", choices=("asha", "fifo"), help="ASHA stops poor trials early; fifo runs all")
    sw.add_argument("--grace-period", type=POSITIVE, help="rounds every trial runs before ASHA may stop it")
    sw.add_argument("--max-concurrent", type=POSITIVE, help="trials at once (default: what the cluster holds)")
    sw.add_argument(
        "--evaluate", action=argparse.BooleanOptionalAction, default=None, help="evaluate each trial's model"
    )
    sw.add_argument("--eval-num", type=POSITIVE, help="generations per trial evaluation")
    sw.add_argument(
        "--time-budget", type=POSITIVE_FLOAT, dest="time_budget_s", help="stop the sweep after about this many s"
    )
    sw.set_defaults(func=cmd_sweep)

    from memshard.serving.requests import ServeLimits

    limits = ServeLimits()  # the flags' defaults are the server's (one place for both)
    sv = sub.add_parser("serve", help="serve RUN's model over HTTP with Ray Serve (PRSS on for text-to-image)")
    sv.add_argument("run", help="run directory (local or s3://)")
    sv.add_argument("--host", default="127.0.0.1", help="address Serve listens on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=POSITIVE, default=8000, help="Serve's HTTP port")
    sv.add_argument("--replicas", type=POSITIVE, default=1, help="model replicas (each loads the model)")
    sv.add_argument("--name", default="memshard", help="Serve application name")
    sv.add_argument("--route-prefix", default="/", help="URL prefix of the endpoints")
    sv.add_argument("--weights", choices=("ema", "raw"), default="ema", help=WEIGHTS_HELP)
    sv.add_argument("--cpus-per-replica", type=POSITIVE_FLOAT, default=1.0, help="CPUs each replica reserves")
    sv.add_argument("--gpus-per-replica", type=NON_NEGATIVE_FLOAT, help="default: 1 if the cluster has GPUs, else 0")
    sv.add_argument("--lambda-ss", type=POSITIVE_FLOAT, help="server floor (requests may only go lower = more private)")
    sv.add_argument("--lambda-pr", type=POSITIVE_FLOAT, help="server floor of the re-anchoring threshold")
    sv.add_argument("--tau", type=POSITIVE_FLOAT, help="server floor of tau (must exceed --lambda-pr)")
    sv.add_argument("--allow-no-prss", action="store_true", help="let requests turn PRSS off")
    sv.add_argument("--max-images", type=POSITIVE, default=limits.max_images, help="images per request")
    sv.add_argument("--max-steps", type=POSITIVE, default=limits.max_steps, help="steps a request may ask for")
    sv.add_argument(
        "--default-steps", type=POSITIVE, default=limits.default_steps, help="steps of a request that names none"
    )
    sv.add_argument(
        "--max-body-bytes", type=POSITIVE, default=limits.max_body_bytes, help="request body size (413 past it)"
    )
    sv.add_argument("--max-batch-images", type=POSITIVE, help="images per batched call (default max(16, --max-images))")
    sv.add_argument(
        "--batch-wait-ms",
        type=NON_NEGATIVE_FLOAT,
        default=limits.batch_wait_s * 1000,
        help="how long a batch waits for more requests",
    )
    sv.add_argument(
        "--deadline-s",
        type=POSITIVE_FLOAT,
        default=limits.deadline_s,
        help="answer each request within this or refuse it (503 + Retry-After)",
    )
    sv.add_argument(
        "--body-timeout-s",
        type=POSITIVE_FLOAT,
        default=limits.body_timeout_s,
        help="a request body must arrive within this (408)",
    )
    sv.add_argument(
        "--max-connections", type=POSITIVE, default=limits.max_connections, help="requests one replica holds at once"
    )
    sv.add_argument(
        "--max-queued-images",
        type=POSITIVE,
        default=limits.max_queued_images,
        help="images admitted and not yet generated",
    )
    sv.add_argument(
        "--request-timeout-s",
        type=POSITIVE_FLOAT,
        help="Serve's end-to-end timeout (default: deadline + body timeout + 10 s)",
    )
    sv.add_argument(
        "--timeout-s", type=POSITIVE_FLOAT, default=600.0, help="wait this long for the deployment to start"
    )
    sv.add_argument("--detach", action="store_true", help="return once deployed (needs RAY_ADDRESS)")
    sv.set_defaults(func=cmd_serve)

    cal = sub.add_parser("calibrate-prss", help="set a text-to-image run's PRSS thresholds from its own magnitudes")
    cal.add_argument("run", help="run directory")
    cal.add_argument(
        "--defend", type=float, help="privacy level: share of the run's duplicated captions to defend (default 0.9)"
    )
    cal.add_argument(
        "--quantile", type=float, help="privacy level q over random training captions: about 1-q trigger (the "
        "fallback when no caption is duplicated)",
    )  # fmt: skip
    cal.add_argument("--num-prompts", type=POSITIVE, default=64, help="training captions sampled for the reference")
    cal.add_argument("--steps", type=POSITIVE, default=50, help="sampling steps of the reference trajectories")
    cal.add_argument("--seed", type=NON_NEGATIVE, default=0, help="which captions and noise")
    cal.add_argument(
        "--detect-step", type=POSITIVE, help="the step whose magnitude triggers (default: the first-quarter step that "
        "best separates duplicated from once-seen captions; 1 without both)",
    )  # fmt: skip
    cal.add_argument(
        "--flat-pr", action="store_true", help="one re-anchoring threshold for every step (the spec's rule) instead "
        "of thresholds that follow the magnitude's per-step scale (pr_profile; --defend levels only)",
    )  # fmt: skip
    cal.set_defaults(func=cmd_calibrate_prss)

    e = sub.add_parser("evaluate", help="memorization, copy similarity, FID (and class alignment) of a run")
    e.add_argument("run", help="run directory")
    add_eval_args(e)
    e.add_argument("--round", type=POSITIVE, help="evaluate the weights committed after this round (default: served)")
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
    fr.add_argument(
        "--factor",
        type=_at_least(1.0, float),
        default=1.05,
        help="matched quality Q = FACTOR x the baseline's best FID",
    )
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
        type=_at_least(1.0, float),
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
    from memshard.data import DataError
    from memshard.evaluation.frontier import FrontierError
    from memshard.io.weights import WeightsError
    from memshard.runtime.driver import RunError

    try:
        return args.func(args)
    except (ConfigError, DataError, RunError, WeightsError, FrontierError, FileNotFoundError) as exc:
        print(f"memshard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # 128 + SIGINT, as shells report it; train says what it kept
        print("memshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
