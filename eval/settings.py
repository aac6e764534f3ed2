"""The settings of one eval/speed.py run, checked: what ``speed.parse_args`` makes of the flags.

Explicit, frozen records instead of the argparse namespace: a :class:`PlannedRun` is what the model
and size flags (``--arch``, ``--mode``, ``--resolutions``, ...) or a suite's run come to, a
:class:`SpeedSettings` everything else. Every part of the harness reads the same names, and a
suite's run that times fewer calls gets its own copy (:meth:`SpeedSettings.for_run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from methods import Method, MethodOptions  # isort: skip
from shared import DTYPES  # isort: skip
from transformer_configs import FLUX_BLOCKS  # isort: skip

#: ``--methods all``: every registered method that runs in the chosen modes and is installed.
ALL = "all"


@dataclass(frozen=True)
class PlannedRun:
    """One measurement of a plan: one model, its modes, resolutions, compile mode and steps.

    A suite's run may also leave out methods that would only repeat another run's (``skip``) and
    time fewer calls than the suite's default (``warmup``, ``repeats``: whole generations cost more).
    """

    arch: str | None
    model: str | None
    modes: tuple[str, ...]
    resolutions: tuple[int, ...]
    compile: str = "none"
    steps: int = 50
    skip: tuple[str, ...] = ()
    warmup: int | None = None
    repeats: int | None = None

    @property
    def source(self) -> str:
        return self.model or f"{self.arch} (random weights)"


@dataclass(frozen=True)
class SpeedSettings:
    """Everything a run of eval/speed.py needs, its defaults those of the flags.

    Attributes:
        runs: The plan's runs (a suite's, or the one the flags describe).
        methods: The methods to compare, checked.
        every_method: ``--methods all``: a method that refuses a model is left out with a note,
            where a method named explicitly stops the run.
        baseline: The method every speed-up and memory ratio is relative to.
        ratios: Merge ratios of the merging methods (repeats dropped).
        batch: The UNet batch: the guided pair of ``batch / 2`` images.
        timestep: Timestep of the UNet forward (``unet`` mode).
        warmup: Untimed calls per method first.
        repeats: Timed calls per method.
        memory: Measure peak memory.
        device: Where it runs.
        dtype: Name of the weights' dtype (a key of :data:`shared.DTYPES`).
        threads: torch CPU threads (``None``: torch's).
        compile_backend: ``torch.compile``'s backend.
        compiler_mode: ``torch.compile``'s mode (``None``: torch's default).
        flux_blocks: Double- and single-stream blocks of the reduced full-width Flux (``--arch flux``).
        options: The peers' knobs.
        out: Folder for speed.json/csv/png.
        suite: The suite's name, if one was asked for.
        flags: The flags as parsed (defaults resolved), for the record in speed.json.
    """

    runs: tuple[PlannedRun, ...] = ()
    methods: tuple[Method, ...] = ()
    every_method: bool = False
    baseline: str = "sd"
    ratios: tuple[float, ...] = (0.4,)
    batch: int = 2
    timestep: int = 981
    warmup: int = 1
    repeats: int = 5
    memory: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: str = "float32"
    threads: int | None = None
    compile_backend: str = "inductor"
    compiler_mode: str | None = None
    flux_blocks: tuple[int, int] = FLUX_BLOCKS
    options: MethodOptions = field(default_factory=MethodOptions)
    out: Path = Path("runs/speed")
    suite: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def for_run(self, run: PlannedRun) -> SpeedSettings:
        """These settings with the calls of ``run`` where it sets its own (a suite's run may time fewer)."""
        calls = {key: value for key in ("warmup", "repeats") if (value := getattr(run, key)) is not None}
        return replace(self, **calls)

    def measures_memory(self, compile_mode: str) -> bool:
        """Whether peak memory is measured: asked for, and not under CUDA graphs (``reduce-overhead``), which
        allocate in their own pool when they record and nothing per call (the peak would read 0)."""
        return self.memory and not (compile_mode != "none" and self.compiler_mode == "reduce-overhead")

    def extra_memory_call(self, compile_mode: str) -> bool:
        """Whether peak memory needs a call of its own: with no warm-up call to measure it in, or compiled
        (a compiling warm-up's allocations are not the method's)."""
        return self.measures_memory(compile_mode) and (compile_mode != "none" or self.warmup == 0)
