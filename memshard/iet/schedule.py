"""The rules between rounds, in one place: when MSR migrates, what the proxies start the next round from.

The driver, the shard actors (through :class:`~memshard.iet.proxy.Proxy`) and the coordinator all
ask these functions, so they cannot disagree about a round. Ray-free and pure: each depends on the
config and the round number only (never on the call that trains it), so a run trained in stages
(``until_round``) or resumed after a crash follows the same schedule as one uninterrupted call.
"""

from __future__ import annotations

from memshard.config import MemshardConfig


def migrates_after(round_id: int, total_rounds: int, every: int) -> bool:
    """Whether a migration is planned after ``round_id`` (every N-th round, never after the last)."""
    return round_id % every == 0 and round_id < total_rounds


def is_migration_round(cfg: MemshardConfig, round_id: int) -> bool:
    """Whether MSR moves samples between shards after ``round_id`` of this run."""
    return cfg.msr.enabled and migrates_after(round_id, cfg.train.rounds, cfg.msr.every)


def starts_from_own_weights(cfg: MemshardConfig, round_id: int) -> bool:
    """After ``round_id``, do proxies continue from their own weights instead of the average?

    Only after a migration round when ``msr.aggregate_on_migration`` is false (the prototype's
    alternation). The average is still computed and served; it is just not loaded back.
    """
    return not cfg.msr.aggregate_on_migration and is_migration_round(cfg, round_id)


def keeps_own_weights(cfg: MemshardConfig) -> bool:
    """Whether a proxy's own end-of-round weights matter in a later round (so they are checkpointed)."""
    return (cfg.msr.enabled and not cfg.msr.aggregate_on_migration) or cfg.proxy.update == "extrapolate"


def extrapolates(cfg: MemshardConfig, round_id: int) -> bool:
    """Whether round ``round_id`` starts from b*theta_bar - (b-1)*theta_i (rounds 2..R_e+1 of ``extrapolate``)."""
    pu = cfg.proxy
    return pu.update == "extrapolate" and 2 <= round_id <= pu.extrapolate_rounds + 1
