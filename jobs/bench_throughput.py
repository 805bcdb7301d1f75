"""The throughput benchmark: what IET-AGC's bookkeeping, the Ray orchestration and aggregation cost.

Issue 8 asks whether the defence is cheap to run, so each part is measured against the
cheapest thing that does the same job, in the same process and the same run:

* ``agc_overhead``: the step time of memshard's :class:`~memshard.iet.proxy.Proxy` loop (AGC skip
  rule, TAA queue mode, memory bank, per-sample statistics) against a minimal plain diffusers
  loop of the same UNet, optimizer (Adam, grad clip, LR warm-up, EMA), batch and device. The
  arms are timed in interleaved repetitions (A B C .. then .. C B A, so slow drift from other
  load cancels) and compared by their medians. Proxy arms with AGC off and with AGC but no
  TAA (and the full IET-AGC+ proxy, threshold skipping included) split the overhead up.
* ``orchestration_overhead``: a small real run on a local Ray cluster (``memshard.runtime.driver.train``
  on the demo preset), read back from RUN/run.json: per round, 1 - max_shards(train_s) /
  round_s, the share of a round not spent training. Round 1 includes actor start-up and is
  left out of the median. The round is broken down from the run directory's file times
  (proxy checkpoints, aggregated weights, statistics) and the driver's ``on_round`` call.
* ``aggregation``: :class:`~memshard.iet.aggregate.StreamingAverage` over K=4 synthetic state dicts
  against this machine's copy bandwidth (``torch.clone`` of a large tensor): aggregation is
  memory bound, so that is its roofline.

Sizes: ``--tiny`` (the test's, seconds), ``--quick`` (a few minutes on 2 CPU cores) and the
default full size (larger models, longer rounds, an 860M-parameter state = Stable Diffusion's
UNet, CUDA for the step timing when there is a GPU).

    OMP_NUM_THREADS=1 python jobs/bench_throughput.py --quick --json /tmp/throughput.json

Each part lives in its own module under jobs/throughput/ (sizes, analysis: the arithmetic, steps,
orchestration, aggregation, search: sampling and k-NN, report); this file only runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# run as a script (python jobs/bench_throughput.py): the checkout (memshard and jobs.throughput), installed or not
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.throughput.aggregation import bench_aggregation
from jobs.throughput.analysis import projection
from jobs.throughput.orchestration import CEILING_FLAG, bench_orchestration, bench_scaling, ceiling_worker
from jobs.throughput.report import table
from jobs.throughput.search import bench_knn, bench_sampling
from jobs.throughput.sizes import ARMS, FAST, HEADLINE, PARTS, SIZES
from jobs.throughput.steps import bench_steps, profile_arms, reference_flops
from memshard.runtime.machine import device_info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CEILING_FLAG:
        ceiling_worker(argv[1], float(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sz = ap.add_mutually_exclusive_group()
    sz.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    sz.add_argument("--tiny", action="store_true", help="the test's size: seconds, numbers meaningless")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results here")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="for the step timing and Ray run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--workdir", default=None, help="where the Ray run goes (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true", help="also profile plain vs agc_taa: where the extra time goes")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    size = SIZES[name]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(f"unknown --parts: {sorted(unknown)}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"size": name, "command": " ".join([os.path.basename(sys.argv[0]), *argv])}
    res["device"] = device_info(device)

    if "agc" in parts:
        cases = size.cuda_cases if (use_cuda and size.cuda_cases) else size.cases
        arms = size.cuda_arms if use_cuda else size.arms
        res["agc_overhead_cases"] = [bench_steps(c, arms, device) for c in cases]
        head = res["agc_overhead_cases"][0]
        h = head["vs_plain"][HEADLINE[0]]
        res["agc_overhead"] = {
            "case": head["case"],
            "method_arm": HEADLINE[0],
            "method": ARMS[HEADLINE[0]][0],
            "baseline_arm": HEADLINE[1],
            "baseline": ARMS[HEADLINE[1]][0],
            "t_agc_s": h["t_method_s"],
            "t_plain_s": h["t_plain_s"],
            "ratio": h["ratio"],
            "overhead_fraction": h["overhead_fraction"],
            "median_paired_ratio": h["median_paired_ratio"],
            "definition": "overhead_fraction = (t_agc - t_plain) / t_plain, medians of per-step times over "
            "interleaved repetitions (one proxy round each, ABC..CBA order); TAA queue-mode extra steps count as "
            "steps, as in the round's step budget.",
        }
        if args.profile:
            res["agc_profile"] = profile_arms(cases[0], list(HEADLINE[::-1]), device)
        fast = [c for c in res["agc_overhead_cases"] if FAST[0] in c["arms"]]
        if fast:
            res["fast_vs_plain"] = [
                {
                    "case": c["case"],
                    "speedup": c["arms"]["plain"]["step_s_median"] / c["arms"]["fast"]["step_s_median"],
                    "images_per_s": c["arms"]["fast"]["images_per_s"],
                    "plain_images_per_s": c["arms"]["plain"]["images_per_s"],
                    "mfu": c["arms"]["fast"]["mfu"],
                    "plain_mfu": c["arms"]["plain"]["mfu"],
                    "compile": c["arms"]["fast"]["compile"],
                }
                for c in fast
            ]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-throughput-")
    try:
        if "orchestration" in parts:
            res["orchestration_overhead"] = bench_orchestration(size, workdir, device)
            res["data_path"] = res["orchestration_overhead"]["data_path"]
        if "scaling" in parts:
            res["scaling"] = bench_scaling(size, workdir, device)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if "aggregation" in parts:
        res["aggregation"] = bench_aggregation(size.agg_params, 4, size.agg_reps, size.copy_params)
    if "aggregation" in parts:
        res["projection"] = projection(res["aggregation"]["traffic_GBps"])
    if "flops" in parts:
        res["reference_flops"] = reference_flops()
    if "sampling" in parts:
        res["sampling"] = bench_sampling(size, device)
    if "knn" in parts:
        res["knn"] = bench_knn(size, device)
    res["total_s"] = time.perf_counter() - t_start
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as fh:
            json.dump(res, fh, indent=2)
    print(table(res))
    print(f"total {res['total_s']:.0f} s" + (f"; results in {args.json_path}" if args.json_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
