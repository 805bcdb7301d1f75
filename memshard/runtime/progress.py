"""What a person watching a run sees: a live step bar per round and one summary line per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typing_extensions import Self

console = Console(highlight=False, soft_wrap=True)


def summary_line(s: dict[str, Any], rounds: int | None = None) -> str:
    """One line per round: the figures a user scans (loss, skip rate, throughput, sizes)."""
    total = f"/{rounds}" if rounds else ""
    sizes = ",".join(str(x) for x in s.get("shard_sizes", []))
    line = (
        f"round {s['round']}{total}  loss {s['loss']:.4f}  skip {100 * s['skip_rate']:.2f}% "
        f"({s['skips']}/{s['visits']} visits, {s['samples_skipped_once']} samples skipped at least once)  "
        f"{s.get('images_per_s', 0):.0f} img/s  {s.get('round_s', 0):.1f}s  shards [{sizes}]"
    )
    if s.get("migration_round") or s.get("migrated"):
        line += f"  migrated {s.get('migrated', 0)}"
    if s.get("augmented"):
        line += f"  augmented {s['augmented']} (mean strength {s['mean_strength']:.2f})"
    if s.get("nonfinite_steps"):
        line += f"  non-finite loss: {s['nonfinite_steps']} steps skipped"
    rejected = [sh["shard"] for sh in s.get("shards", []) if str(sh.get("compile", "")).startswith("rejected")]
    if rejected:
        line += f"  torch.compile rejected on shards {rejected}, training eager (why: run.json)"
    return line


class _Bar:
    """A transient rich progress bar drawn only on a terminal (logs, CI and pipes get none)."""

    def __init__(self, enabled: bool, label: str, out: Console | None = None) -> None:
        out = out or console
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._progress = Progress(*columns, console=out, transient=True) if enabled and out.is_terminal else None

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @property
    def drawn(self) -> bool:
        return self._progress is not None


class RoundProgress(_Bar):
    """A rich progress bar over the optimizer steps of all shards in the current round."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled, "[bold]{task.description}")
        self.enabled = self.drawn
        self._task: Any = None
        self._rounds: int | None = None

    def start_round(self, r: int, rounds: int, total_steps: int) -> None:
        self._rounds = rounds
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"round {r}/{rounds} steps", total=total_steps)

    def update(self, done: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done)

    def round_done(self, summary: dict[str, Any]) -> None:
        console.print(summary_line(summary, self._rounds))


class Stage(_Bar):
    """A progress bar over one stage of long work (generation, features), drawn on a terminal only.

    ``advance(n)`` as parts finish; off a terminal (logs, CI, pipes) it prints nothing beyond the
    stage line callers print themselves, so logs stay readable.
    """

    def __init__(self, description: str, total: int, out: Console | None = None) -> None:
        super().__init__(True, "  {task.description}", out)
        self._task = self._progress.add_task(description, total=total) if self._progress is not None else None

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)
