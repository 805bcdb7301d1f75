"""The compiled proxy step: torch.compile, trusted only once it agrees with eager.

torch.compile can make the UNet step much faster where Python overhead or unfused
element-wise work dominates, but a compiler bug silently trains a different model. One
was found while building this (torch 2.13.0+cpu, inductor, the tiny diffusers UNet):
the forward pass matched eager to 1e-7 while most parameters got zero gradients. So the
proxy compiles lazily and, on the first batch it sees, runs one forward and backward
through the eager module and one through the compiled one on the same inputs and
weights, and compares output and every parameter's gradient. A mismatch means the
proxy trains eager, with a warning naming the worst parameters; the status is reported
per round so a user sees which path ran. It costs two extra forward/backward passes per
actor, once. Only the first batch's shapes are checked: graphs recompiled later for other
shapes (IET-AGC+'s kept-sample batches) are trusted on that evidence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Relative tolerances on the output and on each parameter's gradient: fp32 kernels differ by
# reordering only (~1e-6 relative); bf16/fp16 autocast rounds at different points in fused
# kernels. A miscompile is far outside either (a zero gradient is a relative error of 1).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}


@dataclass
class Parity:
    """How far the compiled module's output and gradients are from eager's."""

    output_error: float  # ||out_c - out_e|| / ||out_e||
    grad_errors: dict[str, float]  # per parameter: ||g_c - g_e|| / (||g_e|| + floor)
    tolerance: float

    @property
    def ok(self) -> bool:
        errors = [self.output_error, *self.grad_errors.values()]
        return all(e <= self.tolerance for e in errors)  # NaN compares False: not ok

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        def badness(item: tuple[str, float]) -> float:  # NaN is the worst
            return math.inf if math.isnan(item[1]) else item[1]

        return sorted(self.grad_errors.items(), key=badness, reverse=True)[:n]

    def describe(self) -> str:
        worst = ", ".join(f"{k} {v:.2g}" for k, v in self.worst())
        return f"output error {self.output_error:.2g}, worst gradient errors: {worst} (tolerance {self.tolerance:g})"


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return float((a.float() - b.float()).norm() / (b.float().norm() + floor))


def gradient_parity(
    eager: torch.nn.Module,
    compiled: Callable[..., torch.Tensor],
    run: Callable[[Callable[..., torch.Tensor]], torch.Tensor],
    tolerance: float,
) -> Parity:
    """Compare ``run(eager)`` and ``run(compiled)``: their outputs and the gradients of a fixed loss.

    ``run(module)`` returns the model output for the caller's batch (autocast included), so
    both paths see exactly the same inputs. The loss is the mean square of the output, a
    function of every weight. Gradients already held by the parameters are restored after.
    """
    named = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in named]
    outs, grads = [], []
    try:
        for fn in (eager, compiled):
            for _, p in named:
                p.grad = None
            out = run(fn)
            out.float().square().mean().backward()
            outs.append(out.detach().float())
            grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in named])
    finally:
        for (_, p), g in zip(named, saved, strict=True):
            p.grad = g
    total = float(torch.sqrt(sum(g.float().square().sum() for g in grads[0])))
    floor = 1e-6 * total  # parameters whose eager gradient is ~0 are judged against the whole gradient
    errors = {n: _relative(gc, ge, floor) for (n, _), ge, gc in zip(named, grads[0], grads[1], strict=True)}
    return Parity(_relative(outs[1], outs[0]), errors, tolerance)


class CompiledModel:
    """The module a proxy's step calls: compiled once verified against eager, else eager.

    ``status`` is ``off`` (compile not asked for), ``pending`` (not yet checked),
    ``verified`` or ``rejected: <why>``.
    """

    def __init__(self, module: torch.nn.Module, enabled: bool, mode: str, amp_dtype: torch.dtype | None) -> None:
        self.module = module
        self.compiled = torch.compile(module, mode=mode) if enabled else None
        self.tolerance = TOLERANCE[amp_dtype or torch.float32]
        self.status = "pending" if enabled else "off"

    def __call__(self, run: Callable[[Callable[..., torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """``run(module)`` with the module to use now (checking the compiled one on first use)."""
        if self.status == "pending":
            self.check(run)
        return run(self.compiled if self.status == "verified" else self.module)

    def check(self, run: Callable[[Callable[..., torch.Tensor]], torch.Tensor]) -> Parity:
        try:
            parity = gradient_parity(self.module, self.compiled, run, self.tolerance)
        except torch.OutOfMemoryError:
            raise  # not a compiler problem: the eager step would fail too
        except Exception as exc:  # a compile failure is a slower run, not a failed one
            self.status = f"rejected: compile failed ({type(exc).__name__}: {exc})"
            log.warning("torch.compile failed, training eager: %s", exc)
            return Parity(float("nan"), {}, self.tolerance)
        if parity.ok:
            self.status = "verified"
        else:
            self.status = f"rejected: compiled gradients differ from eager ({parity.describe()})"
            log.warning("torch.compile disagrees with eager, training eager: %s", parity.describe())
        return parity
