"""How long an eval/speed.py run takes: printed first a priori, then adapted to the first call.

A priori, before any model is built: reference forwards of this project's 2-core CPU
(:data:`workloads.COST_MODELS`), scaled by the cost model of tokens and tokens squared to the
plan's calls (:func:`planned_cost`, :func:`a_priori_rate`). After the first call, adapted to its
seconds (:class:`Estimate`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from settings import PlannedRun, SpeedSettings  # isort: skip
from suites import timed_in  # isort: skip
from workloads import REFERENCE_THREADS, call_forwards, cost_model_for  # isort: skip

#: A first call this many times slower than the reference's says the machine is slower or busy.
PACE_LIMIT = 1.25


def planned_cost(run: PlannedRun, settings: SpeedSettings, variants: dict[str, int]) -> float:
    """Reference forwards of a whole run, ``variants`` being how many are timed in each of its modes."""
    model, extra = cost_model_for(run.arch), int(settings.extra_memory_call(run.compile))
    return sum(
        variants[mode]
        * model.units(px)
        * (
            settings.warmup * call_forwards(mode, run.steps, True)
            + (settings.repeats + extra) * call_forwards(mode, run.steps)
        )
        for mode in run.modes
        for px in run.resolutions
    )


def a_priori_rate(run: PlannedRun, settings: SpeedSettings) -> float | None:
    """Seconds per reference forward to expect here before any call: the reference's, scaled to the
    batch and the threads; ``None`` without a reference (another device, dtype or model)."""
    seconds = cost_model_for(run.arch).seconds
    if seconds is None or settings.device.type != "cpu" or settings.dtype != "float32":
        return None
    return seconds * (settings.batch / 2) * REFERENCE_THREADS / torch.get_num_threads()


def a_priori_seconds(run: PlannedRun, settings: SpeedSettings, plan: Sequence[Any]) -> float | None:
    """The whole run's seconds expected before it starts (every method costed as the baseline), or
    ``None`` without a reference (:func:`a_priori_rate`)."""
    rate = a_priori_rate(run, settings)
    if rate is None:
        return None
    return rate * planned_cost(run, settings, {mode: len(timed_in(mode, plan)) for mode in run.modes})


def print_plan(settings: SpeedSettings, plan: Sequence[Any], runs: Sequence[tuple[Any, ...]]) -> None:
    """The plan, each run with its a-priori seconds, and the whole estimate, before any model is built.

    ``runs``: ``(run, settings, variants, a-priori seconds or None)`` of each run.
    """
    memory = (
        " + peak memory (in the last warm-up; compiled or without one, in an extra call)" if settings.memory else ""
    )
    print(
        f"speed: {settings.suite or 'custom'} plan on {settings.device} {settings.dtype}, batch {settings.batch}, "
        f"{', '.join(v.name for v in plan)}; {settings.warmup} warm-up + {settings.repeats} timed calls each{memory} "
        f"-> {settings.out}/speed.{{json,csv,png}}",
        flush=True,
    )
    for run, *_, seconds in runs:
        details = [f"{run.steps} steps"] if run.modes != ("unet",) else []
        details += [f"{key} {value}" for key in ("warmup", "repeats") if (value := getattr(run, key)) is not None]
        details += [f"without {' '.join(run.skip)}"] if run.skip else []
        details += ["no a-priori estimate" if seconds is None else f"about {duration(seconds)} a priori"]
        print(
            f"  {run.source}: {'+'.join(run.modes)}, {' '.join(map(str, run.resolutions))} px, compile {run.compile}"
            + "".join(f", {detail}" for detail in details),
            flush=True,
        )
    known = [seconds for *_, seconds in runs if seconds is not None]
    if known:
        print(
            f"speed: estimate a priori: about {duration(sum(known))}"
            + ("" if len(known) == len(runs) else " for the runs with a reference")
            + f" on a quiet {REFERENCE_THREADS}-core CPU like the reference's (scaled to {torch.get_num_threads()} "
            "threads), every method costed as the baseline (an upper bound); each run re-estimates after its "
            "first call",
            flush=True,
        )


class Estimate:
    """How long a run takes, adapted to its first call and printed once.

    Costs are reference forwards (:meth:`Workload.cost`). ``speed.main`` prints the a-priori figure
    before any model is built (:func:`a_priori_rate`: the reference seconds of :data:`COST_MODELS`).
    After the run's first call (a warm-up: eager, it costs what any call of its size costs),
    :meth:`show` prints the figure adapted to it: every later call costed at that call's seconds per
    unit, and the plan's later runs (``later``: their a-priori seconds) at the same pace relative to
    the a-priori one. Every method is costed as the first, the baseline, so a faster method makes
    both figures upper bounds. Compiled runs add, for each of the run's ``compilations`` (one per
    method and workload) still to come, the mean compile time of those done so far (their warm-up
    calls minus their cost).
    """

    def __init__(
        self, label: str, total: float, compilations: int, rate: float | None = None, later: float = 0.0
    ) -> None:
        self.label, self.total, self.compilations, self.rate, self.later = label, total, compilations, rate, later
        self.done = 0.0
        self.shown = False

    def add(self, cost: float) -> None:
        self.done += cost

    def show(self, cost: float, seconds: float, compile_seconds: float = 0.0, compiled: int = 0) -> None:
        """After a call of ``cost`` units took ``seconds``; ``compiled`` methods took ``compile_seconds`` each."""
        if self.shown:
            return
        self.shown = True
        rate = seconds / cost
        left = (self.total - self.done) * rate + (self.compilations - compiled) * compile_seconds
        compiling = f" + {compile_seconds:.0f} s compiling per method" if compile_seconds else ""
        pace = ""
        if self.rate is not None:
            factor = rate / self.rate
            pace = f"; {factor:.1f}x the a-priori time per forward"
            pace += " (a slower or busier machine than the reference)" if factor > PACE_LIMIT else ""
            pace += f"; the later runs about {duration(self.later * factor)} at this pace" if self.later else ""
        print(
            f"\nspeed: {self.label}: first call {seconds:.1f} s{compiling}; adapted estimate: about "
            f"{duration(left)} to go{pace} (later calls scaled by size and steps, every method costed as "
            "the first: an upper bound)",
            file=sys.stderr,
            flush=True,
        )


def duration(seconds: float) -> str:
    """``seconds`` as a person reads them: ``5 h 00 min``, ``3 min 20 s``, ``28 s``."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, rest = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
