"""The benchmark's Markdown table, from its results."""

from __future__ import annotations

from typing import Any


def table(res: dict[str, Any]) -> str:
    """The compact human-readable summary printed at the end."""
    lines = []
    for case in res.get("agc_overhead_cases", []):
        lines.append(
            f"step time  {case['case']} ({case['params'] / 1e6:.2f}M params, {case['device']}, "
            f"{case['reps']} reps x {case['steps_per_rep']} steps)"
        )
        lines.append(f"  {'arm':<10} {'ms/step':>9} {'vs plain':>9} {'skip':>6}")
        for arm, a in case["arms"].items():
            vs = case["vs_plain"].get(arm)
            vs_s = f"{vs['overhead_fraction']:+.1%}" if vs else "-"
            skip = a["skip_rate_median"]
            skip_s = f"{skip:.0%}" if skip is not None else "-"
            lines.append(f"  {arm:<10} {a['step_s_median'] * 1e3:>9.2f} {vs_s:>9} {skip_s:>6}")
    o = res.get("orchestration_overhead")
    if o:
        lines.append(
            f"orchestration ({o['config']['shards']} shards x {o['config']['steps_per_round']} steps/round, "
            f"batch {o['config']['batch_size']}; upper bound)"
        )
        lines.append(
            f"  {'round':>5} {'round_s':>8} {'train_max':>9} {'overhead':>8} {'agg_tail':>8} {'commit+pub':>10}"
        )
        for row in o["rounds"]:

            def f(key: str, row: dict = row) -> str:
                return f"{row[key]:.3f}" if row.get(key) is not None else "-"

            lines.append(
                f"  {row['round']:>5} {row['round_s']:>8.3f} {row['train_s_max']:>9.3f} "
                f"{row['overhead_fraction']:>8.1%} {f('aggregation_tail_s'):>8} {f('commit_publish_s'):>10}"
            )
        med = o["overhead_fraction_median"]
        lines.append(f"  median (rounds >= 2): {med:.1%}" if med is not None else "  median: -")
    a = res.get("aggregation")
    if a:
        lines.append(
            f"aggregation  K={a['k']} x {a['params'] / 1e6:.0f}M params: {a['time_s']:.3f} s, "
            f"{a['input_GBps']:.2f} GB/s of states, {a['traffic_GBps']:.2f} GB/s traffic = "
            f"{a['fraction_of_copy_bandwidth']:.0%} of copy_ ({a['copy']['traffic_GBps']:.2f} GB/s), "
            f"{a['fraction_of_clone_bandwidth']:.0%} of clone ({a['copy']['clone_traffic_GBps']:.2f} GB/s)"
        )
    for f in res.get("fast_vs_plain", []):
        mfu = f" (MFU {f['mfu']:.1%} vs {f['plain_mfu']:.1%})" if f["mfu"] is not None else ""
        lines.append(
            f"fast step  {f['case']}: {f['images_per_s']:.0f} vs {f['plain_images_per_s']:.0f} img/s plain eager = "
            f"x{f['speedup']:.2f}{mfu}; compile {f['compile'][:60]}"
        )
    dp = res.get("data_path")
    if dp and dp["idle_fraction_median"] is not None:
        lines.append(
            f"data path  device idle for data: {dp['idle_fraction_median']:.2%} of train time (rounds >= 2), "
            f"{dp['idle_fraction_first_round']:.1%} in round 1 (cold decode)"
        )
    sc = res.get("scaling")
    if sc:
        parts_s = ", ".join(
            f"K={k}: {sc['images_per_s'][k]:.0f} img/s (eff. {sc['efficiency'][k]:.0%})" for k in sc["k"]
        )
        lines.append(f"scaling    {parts_s} on {sc['workers']}")
        if sc.get("ceiling_images_per_s"):
            ceil = sc["ceiling_images_per_s"]
            cells = ", ".join(
                f"K={k}: x{ceil[k] / ceil[1]:.2f} (eff. vs ceiling {sc['efficiency_vs_ceiling'][k]:.0%})"
                for k in sc["k"]
            )
            lines.append(f"  machine ceiling (K independent plain loops): {cells}")
    sm = res.get("sampling")
    if sm:
        lines.append(
            f"sampling   DDIM {sm['steps']} steps, {sm['model']} {sm['image_size']}px: batch {sm['batched']['batch']} "
            f"{sm['batched']['images_per_s']:.1f} img/s vs one at a time {sm['one_at_a_time']['images_per_s']:.1f} "
            f"(x{sm['batching_speedup']:.1f})"
        )
    kn = res.get("knn")
    if kn:
        lines.append(
            f"k-NN       {kn['queries']}x{kn['train']}x{kn['dims']}: {kn['time_s']:.2f} s "
            f"({kn['gflops']:.0f} GFLOP/s); "
            f"65,536x50,000x3072 extrapolated {kn['extrapolated_time_s']:.0f} s"
        )
    prof = res.get("agc_profile")
    if prof:
        tot = prof["total_ms_per_step"]
        lines.append(
            f"profile    self time ms/step: {', '.join(f'{a} {v:.2f}' for a, v in tot.items())}; largest extra:"
        )
        for row in prof["top_extra_ms_per_step"][:8]:
            lines.append(f"  {row['op']:<40} {row['extra_ms']:+.3f} ms ({row['method_ms']:.3f})")
        lines.append(f"  ops only the method calls: {prof['only_in_method_ms_per_step']:.3f} ms/step in all; largest:")
        for row in prof["only_in_method_top"][:6]:
            lines.append(f"  {row['op']:<40} {row['ms']:.3f} ms")
    pr = res.get("projection")
    if pr:
        for nic, rows in pr["nics"].items():
            cells = ", ".join(f"K={r['k']} {r['overhead_s']:.1f} s" for r in rows)
            lines.append(f"projection SD UNet, {nic}: fixed cost per round {cells}")
    for preset, rf in (res.get("reference_flops") or {}).items():
        mfu = ", ".join(f"{r} img/s {v:.1%}" for r, v in rf["h100_mfu_at"].items())
        lines.append(
            f"flops      {preset} ({rf['params'] / 1e6:.1f}M): {rf['flops_per_image'] / 1e9:.2f} GFLOP/img per step; "
            f"H100 MFU at {mfu}"
        )
    d = res["device"]
    lines.append(f"device  {d['cpu_model']} ({d['cpu_count']} cores), torch {d['torch']}, {d['torch_threads']} threads")
    return "\n".join(lines)
