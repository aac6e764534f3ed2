"""Measuring: every variant of a plan warmed up, timed and its peak memory taken, on one workload.

Fairness is built in. Each variant gets its own :func:`twin` of the model (new modules around the
same weight tensors), compiled (:func:`compile_target`), applied and warmed up once, and stays so
for the whole workload. The timed calls then go round the variants in turn, in alternating order
(forward in even repeats, backward in odd ones), so that a drift of a shared machine hits every
variant alike, eager or regionally compiled. Compiled, a variant that fails ``fullgraph=True`` is
compiled again without it, and says so; its compile count is that of its timed calls (0 unless it
recompiles), its graph breaks those of its own compilation.

Regionally compiled variants share one ``torch._dynamo`` cache, reset first: each compiled frame is
a whole transformer block, guarded on its class, hooks and processors. Whole-model compilation
cannot share it: its frames are the UNet's own methods, which every twin runs, and the entries a
variant with graph breaks leaves there (tomesd's) also pass the guards of another twin's calls,
which then run split graphs and recompile. So each variant runs alone there, on a freshly reset
cache, and drift between them is not evened out.

Peak memory is measured in the last warm-up call of an eager variant (its time only feeds the
estimate), else in one extra untimed call (:meth:`settings.SpeedSettings.extra_memory_call`). After
every timed call the machine's load average is recorded, and a busy machine is reported before the
timed calls.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

import timing  # isort: skip
from estimate import Estimate  # isort: skip
from methods import Method, Variant  # isort: skip
from settings import SpeedSettings  # isort: skip
from workloads import SEED, Workload  # isort: skip

#: Called with the results of the variants done so far.
Measured = Callable[[dict[Variant, "Measurement"]], None]


@dataclass
class Measurement:
    """Raw results of one variant on one workload."""

    seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    compiles: int | None = None
    graph_breaks: int | None = None
    note: str | None = None


def twin(target: Any) -> Any:
    """A copy of ``target`` (a UNet or a pipeline) with modules of its own around the same weights.

    Every variant of a workload runs on its own twin, applied (and compiled) once: the variants can
    then be timed in turn, compiled ones each with their compiled code, and none pays for the
    others' weights in memory. Parameters and buffers are shared (put in ``deepcopy``'s memo), the
    rest (module objects, hooks, processors, scheduler, tokenizers) is copied.
    """
    modules = [target] if isinstance(target, torch.nn.Module) else getattr(target, "components", {}).values()
    weights = (
        tensor
        for module in modules
        if isinstance(module, torch.nn.Module)
        for tensor in itertools.chain(module.parameters(), module.buffers())
    )
    return copy.deepcopy(target, memo={id(tensor): tensor for tensor in weights})


def compile_options(backend: str, fullgraph: bool, compiler_mode: str | None = None) -> dict[str, Any]:
    """``torch.compile``'s arguments; ``compiler_mode`` is its ``mode`` (``reduce-overhead``: CUDA graphs), if any."""
    options = {"fullgraph": fullgraph, "dynamic": False, "backend": backend}
    options.update({"mode": compiler_mode} if compiler_mode else {})
    return options


def compile_target(target: Any, mode: str, options: dict[str, Any]) -> None:
    """Compile the UNet of ``target`` (a UNet, or a pipeline's) in place with ``torch.compile``, so that
    patching reaches the compiled code: ``regional``, its repeated blocks; ``full``, the whole UNet.

    Not :func:`agentsd.compile_unet`, which compiles a patched UNet a graph per phase (a method's
    own whole-model compile, :attr:`methods.Method.compile_whole`).
    """
    unet = getattr(target, "unet", target)
    if mode == "regional":
        unet.compile_repeated_blocks(**options)
    elif mode == "full":
        unet.compile(**options)


def own_compile(method: Method, compile_mode: str) -> Callable[[Any, dict[str, Any]], None] | None:
    """The method's own whole-model compile (AgentSD's ``agentsd.compile_unet``), where it has one and
    the mode is ``full``; else ``None``: :func:`compile_target` compiles the twin before it is patched."""
    return method.compile_whole if compile_mode == "full" else None


def compiled_with(method: Method, compile_mode: str) -> str | None:
    """What compiles ``method``'s UNet under ``compile_mode``, as the report names it (``None``: eager)."""
    if compile_mode == "none":
        return None
    if compile_mode == "regional":
        return "compile_repeated_blocks"
    return "torch.compile" if own_compile(method, compile_mode) is None else "agentsd.compile_unet"


def _dynamo_count(group: str, key: str | None = None) -> int:
    """torch._dynamo's running counters: compiled frames (``frames``, ``total``) or graph breaks."""
    from torch._dynamo.utils import counters

    return counters[group][key] if key else sum(counters[group].values())


@dataclass
class _WorkloadSession:
    """The state of measuring one workload: its calls, the results so far and the warm-ups' seconds."""

    workload: Workload
    target: Any
    settings: SpeedSettings
    compile_mode: str
    progress: Any
    estimate: Estimate
    results: dict[Variant, Measurement] = field(default_factory=dict)
    warmups: list[float] = field(default_factory=list)  # every variant's warm-up seconds, compiling included
    prepared: int = 0  # variants compiled and warmed up so far

    @property
    def compiled(self) -> bool:
        return self.compile_mode != "none"

    @property
    def memory_in_warmup(self) -> bool:
        settings, mode = self.settings, self.compile_mode
        return settings.measures_memory(mode) and not settings.extra_memory_call(mode)

    def show(self, variant: Variant, what: str) -> None:
        # Shown while the call runs: a whole generation on a CPU can take many minutes.
        self.progress.set_postfix_str(f"{self.workload.mode} {self.workload.resolution}px {variant.name} {what}")

    def call(self, variant: Variant, generate: Callable[..., Any], what: str, warmup: bool = False) -> float:
        """One call of the workload with ``generate``, timed; a timed call records the machine's load."""
        self.show(variant, what)
        seconds = timing.timed(lambda: self.workload.call(generate, warmup), self.settings.device)
        self.estimate.add(self.workload.cost(warmup))
        self.progress.update()
        if warmup:
            self.warmups.append(seconds)
            if not self.compiled:
                self.estimate.show(self.workload.cost(warmup=True), seconds)
        elif (load := timing.machine_load()) is not None:
            self.results[variant].loads.append(load)
        return seconds

    def warm_up(self, variant: Variant, generate: Callable[..., Any]) -> None:
        """The untimed calls; the last one also measures peak memory where no extra call does."""
        what = "warm-up + compile" if self.compiled else "warm-up"
        for index in range(self.settings.warmup):
            if self.memory_in_warmup and index == self.settings.warmup - 1:
                warm_up = functools.partial(self.call, variant, generate, f"{what} + memory", warmup=True)
                self.results[variant].peak_bytes = timing.peak_memory(warm_up, self.settings.device)
            else:
                self.call(variant, generate, what, warmup=True)

    def attempt(self, variant: Variant, ready: ExitStack, fullgraph: bool) -> Callable[..., Any]:
        """The variant applied to a new compiled twin and warmed up, left applied in ``ready``."""
        model = twin(self.target)
        # A method with its own whole-model compile (AgentSD's compile_unet) compiles once patched.
        whole = own_compile(variant.method, self.compile_mode)
        options: dict[str, Any] = {}
        if self.compiled:
            options = compile_options(self.settings.compile_backend, fullgraph, self.settings.compiler_mode)
            if whole is None:
                compile_target(model, self.compile_mode, options)
        breaks = _dynamo_count("graph_break")
        with ExitStack() as attempt:
            generate = attempt.enter_context(
                variant.method.applied(model, ratio=variant.ratio, seed=SEED, options=self.settings.options)
            )
            if whole is not None:
                whole(model, options)
            self.warm_up(variant, generate)
            ready.enter_context(attempt.pop_all())
        if self.compiled:
            self.results[variant].graph_breaks = _dynamo_count("graph_break") - breaks
        return generate

    def prepare(self, variant: Variant, ready: ExitStack) -> Callable[..., Any]:
        """:meth:`attempt` with ``fullgraph=True``; compiled, once more with graph breaks if that fails."""
        try:
            return self.attempt(variant, ready, fullgraph=True)
        except torch._dynamo.exc.Unsupported as error:
            if not self.compiled:
                raise
            reason = str(error).splitlines()[0]
            self.results[variant].note = f"fullgraph=True failed ({reason}); compiled with graph breaks"
        return self.attempt(variant, ready, fullgraph=False)

    def time(self, group: Sequence[Variant], generates: dict[Variant, Callable[..., Any]]) -> None:
        """The timed calls, round the group in alternating order; compiled, counting recompiles."""
        workload, repeats = self.workload, self.settings.repeats
        for variant in group if self.compiled else ():
            self.results[variant].compiles = 0
        timing.warn_if_busy("speed", f"before timing {workload.mode} at {workload.resolution} px")
        for repeat in range(repeats):
            for variant in group if repeat % 2 == 0 else group[::-1]:
                frames = _dynamo_count("frames", "total")
                seconds = self.call(variant, generates[variant], f"repeat {repeat + 1}/{repeats}")
                self.results[variant].seconds.append(seconds)
                if self.compiled:
                    self.results[variant].compiles += _dynamo_count("frames", "total") - frames
                    # Compiling: the warm-up calls' seconds beyond what they cost once compiled.
                    rate = seconds / workload.cost()
                    warmups = self.warmups
                    compiling = (sum(warmups) - len(warmups) * workload.cost(True) * rate) / self.prepared
                    self.estimate.show(workload.cost(), seconds, compiling, compiled=self.prepared)
                else:
                    self.estimate.show(workload.cost(), seconds)

    def measure_memory(self, group: Sequence[Variant], generates: dict[Variant, Callable[..., Any]]) -> None:
        """Peak memory in one extra untimed call per variant."""
        for variant in group:
            self.show(variant, "memory")
            call_once = functools.partial(self.workload.call, generates[variant], False)
            self.results[variant].peak_bytes = timing.peak_memory(call_once, self.settings.device)
            self.estimate.add(self.workload.cost())
            self.progress.update()

    def run_group(self, group: Sequence[Variant]) -> None:
        """Prepare, time and measure the memory of variants that share one compile cache."""
        self.results.update({variant: Measurement() for variant in group})
        with ExitStack() as ready:
            if self.compiled:
                torch._dynamo.reset()
            generates = {variant: self.prepare(variant, ready) for variant in group}
            self.prepared += len(group)
            self.time(group, generates)
            if self.settings.extra_memory_call(self.compile_mode):
                self.measure_memory(group, generates)


def measure(
    workload: Workload,
    target: Any,
    plan: Sequence[Variant],
    settings: SpeedSettings,
    compile_mode: str,
    progress: Any,
    estimate: Estimate,
    measured: Measured = lambda results: None,
) -> dict[Variant, Measurement]:
    """Warm up, time and measure the memory of every variant on one workload (see the module's docstring).

    ``progress`` is a tqdm bar (``set_postfix_str``, ``update``). ``measured`` gets the results of the
    variants done so far after each one that runs alone but the last (whole model: a minute of
    compiling each on a GPU, so a run stopped at its time limit keeps those done).
    """
    session = _WorkloadSession(workload, target, settings, compile_mode, progress, estimate)
    # Whole-model compilation runs each variant alone on a fresh cache.
    groups = [[variant] for variant in plan] if compile_mode == "full" else [list(plan)]
    for group in groups:
        session.run_group(group)
        if len(groups) > 1 and session.prepared < len(plan):  # after the last, the caller reports the whole workload
            measured({variant: session.results[variant] for variant in plan[: session.prepared]})
    return {variant: session.results[variant] for variant in plan}
