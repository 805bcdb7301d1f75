"""What the throughput benchmark runs: its sizes, step-timing cases and arms."""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_PRESET = "demo"
PARTS = ("agc", "flops", "orchestration", "scaling", "aggregation", "sampling", "knn")


@dataclass(frozen=True)
class StepCase:
    """One model/batch for the step-time comparison."""

    name: str
    overrides: tuple[str, ...]  # on top of the demo preset (model, image size, channels, batch)
    steps: int  # optimizer steps per timed repetition (one proxy round)
    reps: int  # timed repetitions per arm (after one untimed warm-up each)
    samples: int = 256  # synthetic shard size


@dataclass(frozen=True)
class Size:
    """A benchmark size: step-time cases, the Ray run, the aggregation."""

    cases: tuple[StepCase, ...]
    ray_overrides: tuple[str, ...]
    agg_params: int
    agg_reps: int
    copy_params: int  # size of the tensor cloned to measure copy bandwidth (capped by agg_params)
    arms: tuple[str, ...] = ("plain", "agc_off", "agc", "agc_taa", "agc_plus")
    cuda_cases: tuple[StepCase, ...] = field(default_factory=tuple)  # replace ``cases`` when running on CUDA
    # on CUDA the fast arm (torch.compile + channels_last) joins: target 1 is its images/s against plain eager.
    # Not on the CPU: torch 2.13's CPU inductor miscompiles this UNet's backward (memshard/compiled.py), so
    # the arm would time the eager fallback after a two-minute compile.
    cuda_arms: tuple[str, ...] = ("plain", "agc_off", "agc", "agc_taa", "agc_plus", "fast")
    scaling_k: tuple[int, ...] = (1, 2)  # shard counts for the scaling runs (the orchestration run is the largest)
    sampling: tuple[int, int, int] = (32, 10, 32)  # (images, DDIM steps, batch) for the sampling throughput
    knn: tuple[int, int, int] = (2048, 5000, 3072)  # (queries, training images, dims) timed, then extrapolated


TINY_CASE = ("model.preset=tiny", "data.image_size=16", "data.channels=1")


def cifar_case(preset: str, batch: int) -> tuple[str, ...]:
    """Overrides for a UNet preset on CIFAR-shaped images (32x32 RGB) at a batch size."""
    return (f"model.preset={preset}", "data.image_size=32", "data.channels=3", f"train.batch_size={batch}")


SIZES: dict[str, Size] = {
    # the test's size: every code path, numbers meaningless
    "tiny": Size(
        cases=(StepCase("tiny-16px-b8", (*TINY_CASE, "train.batch_size=8"), steps=4, reps=2, samples=32),),
        ray_overrides=(
            "data.limit=48",
            "shards.count=2",
            "train.rounds=3",
            "train.steps_per_round=3",
            "train.batch_size=8",
            "train.warmup_steps=2",
            "resources.cpus_per_shard=0.5",
        ),
        agg_params=1_000_000,
        agg_reps=2,
        copy_params=1_000_000,
        arms=("plain", "agc_off", "agc_taa"),
        sampling=(4, 2, 4),
        knn=(64, 300, 48),
    ),
    # a few minutes on 2 CPU cores: the demo's model and batch
    "quick": Size(
        cases=(StepCase("tiny-16px-b32", (*TINY_CASE, "train.batch_size=32"), steps=12, reps=8),),
        ray_overrides=(
            "data.limit=96",
            "shards.count=2",
            "train.rounds=4",
            "train.steps_per_round=300",  # the spec's round: 100 local epochs of a 48-image shard at batch 16
            "train.batch_size=16",
            "train.warmup_steps=5",
            "resources.cpus_per_shard=0.5",
        ),
        agg_params=50_000_000,
        agg_reps=3,
        copy_params=50_000_000,
    ),
    "full": Size(
        cases=(
            StepCase("tiny-16px-b32", (*TINY_CASE, "train.batch_size=32"), steps=40, reps=9),
            StepCase(
                "small-32px-b32",
                cifar_case("small", 32),
                steps=10,
                reps=5,
            ),
        ),
        cuda_cases=(
            StepCase(
                "small-32px-b128",
                cifar_case("small", 128),
                steps=50,
                reps=9,
                samples=1024,
            ),
            StepCase(
                "ddpm-cifar10-32px-b128",
                cifar_case("ddpm-cifar10", 128),
                steps=30,
                reps=7,
                samples=1024,
            ),
        ),
        # the demo run itself (4 shards x 150 steps of batch 32), one round more for the start-up round
        ray_overrides=("train.rounds=5",),
        scaling_k=(1, 2, 4),
        sampling=(256, 50, 128),
        knn=(8192, 50_000, 3072),
        agg_params=860_000_000,
        agg_reps=3,
        copy_params=250_000_000,
    ),
}

# The arms of the step-time comparison: config switches (None: the plain diffusers loop).
ARMS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "plain": ("plain diffusers loop (same UNet, Adam, grad clip, LR warm-up, EMA, batch); no AGC/TAA/stats", None),
    "agc_off": ("Proxy, AGC off, TAA off (memory bank and per-sample statistics still kept)", ("agc.enabled=false",)),
    "agc": ("Proxy, AGC on (masked loss), TAA off", ("agc.enabled=true",)),
    "agc_taa": (
        "Proxy, AGC on (masked loss), TAA on (queue mode), statistics",
        ("agc.enabled=true", "taa.enabled=true"),
    ),
    "agc_plus": (
        "Proxy, IET-AGC+ (threshold skipping before backward, TAA queue mode)",
        ("agc.enabled=true", "taa.enabled=true", "agc.decide_before_backward=true"),
    ),
}
ARMS["fast"] = (
    "Proxy as agc_taa, torch.compile (verified against eager on the first batch) + channels_last",
    ("agc.enabled=true", "taa.enabled=true", "train.compile=true", "train.channels_last=true"),
)
HEADLINE = ("agc_taa", "plain")
FAST = ("fast", "plain")  # target 1: the shard actor's step against the plain eager loop

# Dense bf16 tensor-core peaks (FLOP/s, SXM parts, no sparsity) for MFU; other devices report FLOP/s only.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

# What a 65,536 x 50,000 nearest-neighbour search of 32x32x3 images is (issue 8, item 6).
KNN_TARGET = (65_536, 50_000, 3072)
