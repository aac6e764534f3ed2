"""eval/speed.py's plans as data: a :class:`Suite` is a named plan of runs (:class:`settings.PlannedRun`:
one model measured in some modes, at some resolutions, with one compile mode) with the settings that
replace the flags' defaults (``--suite NAME``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from settings import PlannedRun  # isort: skip
from workloads import HIRES_STRENGTH, HIRES_UPSCALE  # isort: skip

MODES = ("unet", "pipeline", "hires")
COMPILE_MODES = ("none", "regional", "full")


@dataclass(frozen=True)
class Suite:
    """A named plan: settings that replace the flags' defaults (flags given still win), and its runs."""

    summary: str
    settings: dict[str, Any]
    runs: tuple[PlannedRun, ...]


#: What the GPU suite compares: the baseline, tomesd, ToDo, AgentSD's recipe and its two phases, and
#: the ceiling (patched blocks skip self-attention: the most any merging of that level could gain).
GPU_METHODS = ("sd", "tomesd", "todo", "agentsd", "agent-phase", "tome-phase", "ceiling")
#: One forward at t = 981 is the recipe's agent phase: the recipe is timed over whole generations,
#: its two phases on one forward each.
_FORWARD_SKIPS = ("agentsd",)
_GENERATION_SKIPS = ("agent-phase", "tome-phase")

#: Whole-model compiled on a GPU, each method costs about 50 s of compiling per size and graph (H200,
#: torch 2.11): the gpu-compile suite keeps the ones its question needs (does AgentSD beat SD once
#: launches are free?). tomesd is left out: its graph breaks leave CUDA graphs only pieces of the UNet.
#: AgentSD's recipe compiles with agentsd.compile_unet, a graph per phase, each captured whole (a
#: ``torch.cond`` would keep the whole graph out of CUDA graphs), timed over whole generations, which run
#: both graphs. Compiled single forwards (sd, todo, the agent phase at 512/1024 px) are in
#: BENCHMARKS.md: ``--mode unet`` reruns them.
GPU_COMPILE_METHODS = ("sd", "todo", "agentsd", "agent-phase")

# Cheapest and most asked-for first: every run's rows are written when it ends, so a run stopped
# at the time limit keeps what it measured. 2048 px has its own run with fewer repeats (drop
# repeats, not sizes: the suite must fit its 8 minutes).
_GPU_RUNS = (
    PlannedRun("sd15", None, ("unet",), (512, 768, 1024), skip=_FORWARD_SKIPS),
    PlannedRun("sdxl", None, ("unet",), (1024,), skip=_FORWARD_SKIPS),
    PlannedRun("sd15", None, ("unet",), (2048,), skip=_FORWARD_SKIPS, repeats=5),
    PlannedRun("sd15", None, ("unet",), (1024,), compile="regional", skip=_FORWARD_SKIPS),
    PlannedRun("sd15", None, ("pipeline",), (512, 1024), steps=20, skip=_GENERATION_SKIPS, warmup=1, repeats=3),
    PlannedRun("sdxl", None, ("unet",), (1024,), compile="regional", skip=_FORWARD_SKIPS),
)

#: The high-resolution table: one forward (t = 981, the agent phase), batch 2, from 1024 to 2048 px, the
#: ceiling at every size. SDXL without tomesd and the ToMe phase; AgentSD's default patch there is
#: its top attention level (downsample 2). One run per size, cheapest first, so that every size's
#: rows are written as soon as it is done; 2048 px with one timed call (a 2048 px SD 1.5 forward is
#: about 11 min on 2 CPU cores).
HIGHRES_METHODS = ("sd", "tomesd", "todo", "agent-phase", "tome-phase", "ceiling")
_HIGHRES_XL_SKIPS = ("tomesd", "tome-phase")
_HIGHRES_RUNS = (
    PlannedRun("sd15", None, ("unet",), (1024,)),
    PlannedRun("sdxl", None, ("unet",), (1024,), skip=_HIGHRES_XL_SKIPS),
    PlannedRun("sd15", None, ("unet",), (1536,)),
    PlannedRun("sd15", None, ("unet",), (2048,), repeats=1),
    PlannedRun("sdxl", None, ("unet",), (2048,), skip=_HIGHRES_XL_SKIPS, repeats=1),
)

#: The diffusion transformers (SD3.5 Medium, PixArt-Sigma, full-width Flux with one block of each kind):
#: one forward (t = 981, the agent phase), the baseline, ToDo, AgentSD's two phases and the ceiling.
DIT_METHODS = ("sd", "todo", "agent-phase", "tome-phase", "ceiling")
_DIT_RUNS = tuple(
    PlannedRun(arch, None, ("unet",), (px,)) for px in (1024, 2048) for arch in ("pixart-sigma", "flux", "sd35-medium")
)

SUITES: dict[str, Suite] = {
    "quick": Suite(
        "SD 1.5 architecture, one UNet forward at 512 px: sd, tomesd and AgentSD's two phases, "
        "1 warm-up + 2 timed calls each, no memory call (about 2 min on 2 quiet CPU cores; the script "
        "prints its own estimate, adapted to the first call, and warns when the machine is busy)",
        {"methods": ["sd", "tomesd", "agent-phase", "tome-phase"], "warmup": 1, "repeats": 2, "memory": False},
        (PlannedRun("sd15", None, ("unet",), (512,)),),
    ),
    "highres": Suite(
        "one UNet forward, batch 2, peak memory: the SD 1.5 architecture at 1024/1536/2048 px (sd, tomesd, "
        "todo, AgentSD's two phases, ceiling) and SDXL at 1024/2048 px (sd, todo, agent phase, ceiling); "
        "1 warm-up + 2 timed calls (1 at 2048 px); every figure with how far it gets to the ceiling "
        "(about 5 h on 2 CPU cores, an upper bound: the script prints its estimate first)",
        {"methods": list(HIGHRES_METHODS), "warmup": 1, "repeats": 2, "memory": True},
        _HIGHRES_RUNS,
    ),
    "hires": Suite(
        f"the hires fix's second pass on the SD 1.5 architecture: image-to-image at 1024 px, strength "
        f"{HIRES_STRENGTH:g}, from a {HIRES_UPSCALE}x-upscaled 512 px latent, 20 steps (10 run): sd, tomesd, "
        "todo, agentsd (its recipe runs only its ToMe phase there), 1 warm-up + 1 timed call",
        {"methods": ["sd", "tomesd", "todo", "agentsd"], "warmup": 1, "repeats": 1, "memory": False},
        (PlannedRun("sd15", None, ("hires",), (1024,), steps=20),),
    ),
    "gpu": Suite(
        "one GPU, fp16, batch 2, in about 5 min on an H200: one forward of the SD 1.5 architecture at 512/768/1024 px "
        "and of SDXL at 1024 px, eager and (1024 px) regionally compiled: sd, tomesd, todo, AgentSD's two "
        "phases, ceiling, median of 10 after 3 warm-ups; at 2048 px (SD 1.5), median of 5; a 20-step "
        "generation at 512/1024 px: sd, tomesd, todo, AgentSD's recipe, ceiling, median of 3; peak memory",
        {"methods": list(GPU_METHODS), "dtype": "float16", "warmup": 3, "repeats": 10, "memory": True},
        _GPU_RUNS,
    ),
    "gpu-compile": Suite(
        "one GPU, fp16: the whole UNet compiled with mode reduce-overhead (CUDA graphs), each method alone on "
        "a fresh compile cache: a 20-step generation of the SD 1.5 architecture at 1024 and 512 px, sd, todo "
        "and AgentSD's recipe (agentsd.compile_unet: a graph per phase), median of 3 after one warm-up "
        "generation; first, sd, todo and the agent phase eager, one forward at 512/1024 px, median of 10 "
        "after 3 warm-ups (seconds: the eager baseline of the same session); about 50 s of compiling per "
        "method, size and graph on an H200, 8.5 minutes in all: a call of its own, not part of the gpu suite",
        {
            "methods": list(GPU_COMPILE_METHODS),
            "dtype": "float16",
            "warmup": 3,
            "repeats": 10,
            "memory": True,
            "compiler_mode": "reduce-overhead",
        },
        (
            PlannedRun("sd15", None, ("unet",), (512, 1024), skip=_FORWARD_SKIPS),
            PlannedRun(
                "sd15",
                None,
                ("pipeline",),
                (1024, 512),
                compile="full",
                steps=20,
                skip=_GENERATION_SKIPS,
                warmup=1,
                repeats=3,
            ),
        ),
    ),
    "dit": Suite(
        "one forward of the diffusion transformers at 1024 and 2048 px, peak memory: PixArt-Sigma, Flux at full "
        "width with one double- and one single-stream block (--flux-blocks), SD3.5 Medium; sd, todo, AgentSD's two "
        "phases, ceiling; 1 warm-up + 2 timed calls (hours on 2 CPU cores at 2048 px: benchmarks/block.py times "
        "one block in minutes)",
        {"methods": list(DIT_METHODS), "warmup": 1, "repeats": 2, "memory": True},
        _DIT_RUNS,
    ),
    "gpu-dit": Suite(
        "one GPU, fp16: the dit suite's forwards (PixArt-Sigma, full-width Flux with a block of each kind, SD3.5 "
        "Medium at 1024 and 2048 px; sd, todo, AgentSD's two phases, ceiling), median of 10 after 3 warm-ups",
        {"methods": list(DIT_METHODS), "dtype": "float16", "warmup": 3, "repeats": 10, "memory": True},
        _DIT_RUNS,
    ),
    "gpu-smoke": Suite(
        "the gpu suite's plan on the tiny architectures at 64 px, 2 steps, 1 timed call, compiled with "
        "the 'eager' backend: checks on any machine, in about a minute, that the suite runs",
        {
            "methods": list(GPU_METHODS),
            "device": "cpu",
            "dtype": "float32",
            "warmup": 1,
            "repeats": 1,
            "memory": True,
            "compile_backend": "eager",
        },
        tuple(
            replace(run, arch={"sd15": "tiny", "sdxl": "tiny-xl"}[run.arch], resolutions=(64,), steps=2, repeats=None)
            for run in _GPU_RUNS
        ),
    ),
}


def timed_in(mode: str, plan: Sequence[Any]) -> list[Any]:
    """The variants (:class:`methods.Variant`) that ``mode`` can time: those with their own denoising loop
    only in whole generations."""
    return [variant for variant in plan if mode == "pipeline" or not variant.method.needs_pipeline]
