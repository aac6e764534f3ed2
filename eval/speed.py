"""Speed and memory of AgentSD against the SDPA baseline and the other registered methods.

Run, with the package installed (``pip install -e ".[eval]"``), e.g.::

    python eval/speed.py --suite quick                  # about two minutes on 2 quiet CPU cores
    python eval/speed.py --arch sd15 --resolutions 512 768 1024 --mode unet
    python eval/speed.py --arch sd15 --mode pipeline --steps 20 --methods deepcache agentsd+deepcache sd
    python eval/speed.py --suite highres                # 1024-2048 px, with the ceiling: hours on a CPU
    python eval/speed.py --suite hires                  # the hires fix's second pass at 1024 px
    python eval/speed.py --suite gpu                    # one GPU, fp16, at most 8 minutes

Three measurements, chosen with ``--mode``:

* ``unet``: one UNet forward on the classifier-free-guidance batch (``--batch``, 2 by default),
  random latents of ``resolution / vae_scale_factor`` and random text embeddings, at a fixed
  ``--timestep`` (981 by default, inside the recipe's agent phase). Reported in seconds per forward.
  Methods that need the pipeline's own loop (DeepCache, T-GATE) cannot run here.
* ``pipeline``: a whole guided generation of ``--steps`` steps, in seconds per image (``batch / 2``
  images per call), through the method's own call (DeepCache and T-GATE run their loops). With
  ``--arch`` the pipeline is a real diffusers pipeline around the full-size random-weight UNet with
  toy text encoders and VAE (``unet_configs.Arch.build_pipeline``); with ``--model`` the real one.
  Both run with ``output_type="latent"``: the VAE decode is no method's business.
* ``hires``: the hires fix's second pass, in seconds per image: image-to-image at ``--resolutions``
  and strength 0.5 from a latent of half the size upscaled 2x, ``int(steps * 0.5)`` steps. AgentSD's
  recipe switches phase by noise level (agent phase for t >= 0.6 T), so it runs its ToMe phase only
  there, and its rows say so.

Every method comes from the one registry, ``eval/methods.py``. Fairness is built in: the same
weights, seeded inputs, seeds and settings for every method, warm-up calls before timing, and
methods interleaved within each repeat, in alternating order (forward in even repeats, backward in
odd ones) so that a drift of a shared machine during a repeat hits every method alike; medians are
shown with their min-max. Each method runs on its own twin of the model (new modules around the
same weight tensors), compiled (``--compile regional|full``), patched and warmed up once, so that
regionally compiled methods are interleaved too; whole-model compiled ones run one after another,
each on a fresh ``torch._dynamo`` cache (see :func:`measure`). The reported compile count of the
timed calls shows whether a method recompiles.

Peak memory is measured in the last warm-up call per method and resolution (in one extra untimed
call when compiled or without warm-up): the peak of the memory allocated during the call above what
was allocated before it (weights and inputs excluded), divided by the images in the call. On CUDA
it comes from torch's allocator statistics; on CPU from the allocation and free events that
``torch.profiler`` records for torch tensors (memory allocated outside torch's allocator, such as
oneDNN scratch space, is not seen).

How long a run takes is printed first, a priori (before any model is built: reference forwards
of this project's 2-core CPU, scaled by a cost model of tokens and tokens squared, :class:`CostModel`),
then again after the first call, adapted to its seconds (:class:`Estimate`). Timings are only as
good as the machine is quiet: the load average is read before and after every timed call, and a
load above the CPU count, or timed calls of one method spreading over 10% of their median, end the
output with a warning (``speed_report.noise_warnings``). When the ceiling is timed, every row says
how far it gets from the baseline towards it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import itertools
import math
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Kineto (torch.profiler's backend, used for CPU peak memory) prints "USDT: ... profiler_start" and
# "profiler_stop" lines on stderr around every profiling session unless its log level is above 5.
# It reads the level once, when the first profiler of the process starts: hence here, at import.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from tqdm import tqdm  # noqa: E402

from agentsd.config import RECIPE_SWITCH  # noqa: E402

# Sibling script modules: eval/ is sys.path[0] when this file runs as a script.
from methods import METHODS, Method, Variant, add_method_arguments, options_from, resolve_methods  # noqa: E402 isort: skip
from methods import variants as method_variants  # noqa: E402 isort: skip
from speed_report import Row, busy, format_table, machine_info, noise_warnings, write_outputs  # noqa: E402 isort: skip
from unet_configs import ARCHS, TEXT_TOKENS, Arch  # noqa: E402 isort: skip

MODES = ("unet", "pipeline", "hires")
COMPILE_MODES = ("none", "regional", "full")
#: diffusers release that added ``ModelMixin.compile_repeated_blocks`` and the UNet's ``_repeated_blocks``.
REGIONAL_DIFFUSERS = "0.35"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALL = "all"

SEED = 0
#: Steps of a warm-up generation in pipeline mode: enough to run every code path of the loop once
#: (first step, cached steps, both recipe phases) at a fraction of a full generation's cost.
WARMUP_STEPS = 3
GUIDANCE_SCALE = 7.5
#: The hires fix's second pass (``--mode hires``): image-to-image at this strength from the first
#: pass's latent upscaled this many times (the common 512 -> 1024 px workflow at strength 0.4-0.6).
HIRES_STRENGTH = 0.5
HIRES_UPSCALE = 2
#: AgentSD's recipe picks its phase by noise level, not by step: its agent phase covers t >= 0.6 T.
HIRES_RECIPE_NOTE = (
    f"the pass starts at t = {HIRES_STRENGTH:g} T, below the recipe's agent phase (t >= {RECIPE_SWITCH:g} T): "
    "it runs the ToMe phase only"
)
PROMPT = "a high quality photograph of a corgi"
MIB = 2**20
CPUS = os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------
# Suites: named plans of runs, each a source, a mode, resolutions and a compile mode
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
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
class Suite:
    """A named plan: settings that replace the flags' defaults (flags given still win), and its runs."""

    summary: str
    settings: dict[str, Any]
    runs: tuple[Run, ...]


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
#: both graphs. Compiled single forwards (sd, todo, the agent phase at 512/1024 px) were measured on
#: 2026-12-01 (BENCHMARKS.md): ``--mode unet`` reruns them.
GPU_COMPILE_METHODS = ("sd", "todo", "agentsd", "agent-phase")

# Cheapest and most asked-for first: every run's rows are written when it ends, so a run stopped
# at the time limit keeps what it measured. 2048 px has its own run with fewer repeats (drop
# repeats, not sizes: the suite must fit its 8 minutes).
_GPU_RUNS = (
    Run("sd15", None, ("unet",), (512, 768, 1024), skip=_FORWARD_SKIPS),
    Run("sdxl", None, ("unet",), (1024,), skip=_FORWARD_SKIPS),
    Run("sd15", None, ("unet",), (2048,), skip=_FORWARD_SKIPS, repeats=5),
    Run("sd15", None, ("unet",), (1024,), compile="regional", skip=_FORWARD_SKIPS),
    Run("sd15", None, ("pipeline",), (512, 1024), steps=20, skip=_GENERATION_SKIPS, warmup=1, repeats=3),
    Run("sdxl", None, ("unet",), (1024,), compile="regional", skip=_FORWARD_SKIPS),
)

#: Issue 16.3's table: one forward (t = 981, the agent phase), batch 2, from 1024 to 2048 px, the
#: ceiling at every size. SDXL without tomesd and the ToMe phase; AgentSD's default patch there is
#: its top attention level (downsample 2). One run per size, cheapest first, so that every size's
#: rows are written as soon as it is done; 2048 px with one timed call (a 2048 px SD 1.5 forward is
#: about 11 min on 2 CPU cores).
HIGHRES_METHODS = ("sd", "tomesd", "todo", "agent-phase", "tome-phase", "ceiling")
_HIGHRES_XL_SKIPS = ("tomesd", "tome-phase")
_HIGHRES_RUNS = (
    Run("sd15", None, ("unet",), (1024,)),
    Run("sdxl", None, ("unet",), (1024,), skip=_HIGHRES_XL_SKIPS),
    Run("sd15", None, ("unet",), (1536,)),
    Run("sd15", None, ("unet",), (2048,), repeats=1),
    Run("sdxl", None, ("unet",), (2048,), skip=_HIGHRES_XL_SKIPS, repeats=1),
)

SUITES: dict[str, Suite] = {
    "quick": Suite(
        "SD 1.5 architecture, one UNet forward at 512 px: sd, tomesd and AgentSD's two phases, "
        "1 warm-up + 2 timed calls each, no memory call (about 2 min on 2 quiet CPU cores; the script "
        "prints its own estimate, adapted to the first call, and warns when the machine is busy)",
        {"methods": ["sd", "tomesd", "agent-phase", "tome-phase"], "warmup": 1, "repeats": 2, "memory": False},
        (Run("sd15", None, ("unet",), (512,)),),
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
        (Run("sd15", None, ("hires",), (1024,), steps=20),),
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
            Run("sd15", None, ("unet",), (512, 1024), skip=_FORWARD_SKIPS),
            Run(
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

#: Flags that a suite's runs set themselves (flag name, argparse dest).
_RUN_FLAGS = (
    ("--arch", "arch"),
    ("--model", "model"),
    ("--mode", "mode"),
    ("--resolutions", "resolutions"),
    ("--compile", "compile"),
    ("--steps", "steps"),
)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _number(text: str, kind: type[int | float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


def _resolution(text: str) -> int:
    value = _number(text, int)
    if value <= 0 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 64 pixels, got {text}")
    return value


def _ratio(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 0.75:
        # tomesd and the ToMe phase use 2x2 destination cells: at most 3 of every 4 tokens merge.
        raise argparse.ArgumentTypeError(f"must be in (0, 0.75], got {text}")
    return value


def _timestep(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 1000:
        raise argparse.ArgumentTypeError(f"must be a training timestep in [0, 999], got {text}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available")
    return device


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default, once: not when the help already states it or there is none (``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    suites = "\n".join(
        textwrap.fill(f"{name}: {suite.summary}", 100, initial_indent="  ", subsequent_indent="    ")
        for name, suite in SUITES.items()
    )
    parser = argparse.ArgumentParser(
        description="Seconds per UNet forward / per image and peak memory of the registered methods.",
        formatter_class=_HelpFormatter,
        epilog=f"suites (--suite NAME; flags given next to it override its settings):\n{suites}\n\n"
        f"--methods {ALL} (the default): every registered method that runs in the chosen --mode and is installed.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        help="full-size architecture with random weights; sd15 when neither --arch nor --model is given",
    )
    source.add_argument("--model", help="a text-to-image diffusers pipeline instead: hub id or local folder")
    parser.add_argument("--suite", choices=sorted(SUITES), help="a named plan of runs (see below)")
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="unet",
        help="unet: one UNet forward; pipeline: a whole generation; hires: the hires fix's second pass "
        f"(image-to-image at {HIRES_STRENGTH:g} strength of a {HIRES_UPSCALE}x-upscaled latent, at --resolutions, "
        "int(steps * strength) steps); both: unet then pipeline",
    )
    parser.add_argument(
        "--resolutions", type=_resolution, nargs="+", default=[512, 768, 1024], metavar="PX", help="image sizes"
    )
    add_method_arguments(parser, default=[ALL])
    parser.add_argument(
        "--baseline", default="sd", metavar="NAME", help="the method every speed-up and memory ratio is relative to"
    )
    parser.add_argument(
        "--ratios", type=_ratio, nargs="+", default=[0.4], metavar="R", help="merge ratios of the merging methods"
    )
    parser.add_argument("--steps", type=_int_at_least(1), default=50, help="denoising steps (pipeline mode)")
    parser.add_argument(
        "--batch", type=_int_at_least(2), default=2, help="UNet batch, even: the guided pair of batch/2 images"
    )
    parser.add_argument("--timestep", type=_timestep, default=981, help="timestep of the UNet forward (unet mode)")
    parser.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed calls per method")
    parser.add_argument(
        "--warmup",
        type=_int_at_least(0),
        default=1,
        help=f"untimed calls per method first (pipeline mode: {WARMUP_STEPS}-step generations)",
    )
    parser.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda, float32 on cpu"
    )
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        nargs="?",
        const="full",
        default="none",
        help="none: eager; regional: diffusers' unet.compile_repeated_blocks(fullgraph=True); "
        "full: torch.compile(unet, fullgraph=True) of the whole UNet (a bare --compile; AgentSD's methods: "
        "agentsd.compile_unet, a graph per phase); a method that cannot compile whole (tomesd) is compiled "
        "again with graph breaks, and says so; dynamic=False, each method on its own twin",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend ('eager' checks tracing only)"
    )
    parser.add_argument(
        "--compiler-mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        default=None,
        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs; default: torch's)",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory (one extra untimed call per method and resolution)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/speed"), help="folder for speed.json/csv/png")
    return parser


def _regional_unsupported() -> str | None:
    """Why ``--compile regional`` cannot run with the installed diffusers, else ``None``."""
    import diffusers
    from diffusers import UNet2DConditionModel

    if hasattr(UNet2DConditionModel, "compile_repeated_blocks") and getattr(
        UNet2DConditionModel, "_repeated_blocks", None
    ):
        return None
    return (
        f"regional needs diffusers >= {REGIONAL_DIFFUSERS} (UNet2DConditionModel.compile_repeated_blocks); "
        f"installed {diffusers.__version__}: pip install 'diffusers>={REGIONAL_DIFFUSERS}'"
    )


def _plan_runs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Run, ...]:
    if args.suite is None:
        modes = ("unet", "pipeline") if args.mode == "both" else (args.mode,)
        arch = None if args.model else args.arch or "sd15"
        return (Run(arch, args.model, modes, tuple(dict.fromkeys(args.resolutions)), args.compile, args.steps),)
    given = [flag for flag, dest in _RUN_FLAGS if getattr(args, dest) != parser.get_default(dest)]
    if given:
        parser.error(f"argument --suite: {args.suite} sets {', '.join(given)} itself; drop {' '.join(given)}")
    return SUITES[args.suite].runs


def _plan_methods(args: argparse.Namespace, runs: Sequence[Run], parser: argparse.ArgumentParser) -> list[Method]:
    """The methods to compare, checked now; ``all`` expands to those the runs' modes can time."""
    pipeline = any("pipeline" in run.modes for run in runs)
    if args.methods == [ALL]:
        skipped = {m.name: why for m in METHODS.values() if (why := m.unavailable())}
        for name, why in skipped.items():
            print(f"speed: --methods {ALL} leaves out {name}: {why}", file=sys.stderr)
        names = [n for n, m in METHODS.items() if n not in skipped and (pipeline or not m.needs_pipeline)]
    else:
        names = args.methods
    try:
        methods = resolve_methods(names)
    except ValueError as error:
        parser.error(f"argument {error}")
    if args.baseline not in [m.name for m in methods]:
        parser.error(
            f"argument --baseline: {args.baseline!r} is not among --methods {' '.join(m.name for m in methods)}; "
            "every speed-up is relative to it"
        )
    if not pipeline and (loops := [m.name for m in methods if m.needs_pipeline]):
        parser.error(
            f"argument --methods: {', '.join(loops)} run the pipeline's own loop and cannot time a bare UNet "
            "forward or the hires pass: use --mode pipeline (or both)"
        )
    return methods


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; every error is raised here, before any model is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = _plan_runs(args, parser)
    if args.suite is not None:
        parser.set_defaults(**SUITES[args.suite].settings)
        args = parser.parse_args(argv)
    args.runs = runs
    args.method_list = _plan_methods(args, runs, parser)
    args.options = options_from(args)
    if args.batch % 2:
        parser.error(f"argument --batch: must be even (the unconditional and prompted halves), got {args.batch}")
    if any("hires" in run.modes and hires_steps(run.steps)[1] < 1 for run in runs):
        parser.error(f"argument --steps: the hires pass runs int(steps * {HIRES_STRENGTH:g}) steps; give at least 2")
    if any("hires" in run.modes and any(px % (64 * HIRES_UPSCALE) for px in run.resolutions) for run in runs):
        parser.error(f"argument --resolutions: the hires pass needs multiples of {64 * HIRES_UPSCALE} px")
    compiled = {run.compile for run in runs} - {"none"}
    if compiled and args.warmup < 1:
        parser.error("argument --warmup: --compile needs at least 1, the first call of each method compiles")
    if "regional" in compiled and (why := _regional_unsupported()):
        parser.error(f"argument --compile: {why}")
    if args.device is None:
        args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a folder")
    args.ratios = list(dict.fromkeys(args.ratios))
    return args


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------

#: Runs one call of a workload: ``call(generate, warmup)``, ``generate`` being the method's.
WorkloadCall = Callable[[Callable[..., Any], bool], Any]


@dataclass(frozen=True)
class CostModel:
    """How one UNet forward's time grows with the image, for the run's estimates.

    A forward at ``resolution`` costs ``(1 - quadratic) p + quadratic p**2`` reference forwards,
    ``p`` being its pixels over the reference's: convolutions and projections grow with the tokens,
    attention with their square (the top level's self-attention above all).

    Attributes:
        pixels: Side of the reference forward (the architecture's first measured size).
        quadratic: The share of the reference forward that grows with the tokens squared.
        seconds: The reference forward (batch 2, float32) on this project's 2-core CPU, nothing else
            running, with 2 threads; ``None`` where not measured (no a-priori estimate then).
    """

    pixels: int
    quadratic: float
    seconds: float | None = None

    def units(self, resolution: int) -> float:
        """Reference forwards in one forward at ``resolution``."""
        pixels = (resolution / self.pixels) ** 2
        return (1 - self.quadratic) * pixels + self.quadratic * pixels**2


#: Threads of the reference forwards of :data:`COST_MODELS`.
REFERENCE_THREADS = 2
#: SD 1.5: fits its CPU forwards of 10.2, 28.4 and 68.4 s at 512, 768 and 1024 px (model: 1, 2.8, 6.4).
#: SDXL: 79.9 s at 1024 px (BENCHMARKS.md C); attention is 11.6% of its FLOPs there (SD 1.5 at 512
#: px: 16%, for 20% of the time), hence 0.15. Other UNets (tiny ones, SD 2.1, ``--model``) are
#: costed with SD 1.5's shape and get no a-priori seconds: their first call sets the pace.
COST_MODELS: dict[str, CostModel] = {"sd15": CostModel(512, 0.2, 10.2), "sdxl": CostModel(1024, 0.15, 79.9)}
DEFAULT_COST = CostModel(512, 0.2)


def run_cost_model(run: Run) -> CostModel:
    return COST_MODELS.get(run.arch or "", DEFAULT_COST)


def call_forwards(mode: str, steps: int, warmup: bool = False) -> int:
    """UNet forwards of one call: one; a generation's steps (a warm-up's few); the hires pass's denoising steps."""
    if mode == "unet":
        return 1
    if mode == "hires":
        return hires_steps(steps, warmup)[1]
    return min(steps, WARMUP_STEPS) if warmup else steps


def measures_memory(args: argparse.Namespace, compile_mode: str) -> bool:
    """Whether peak memory is measured: asked for, and not under CUDA graphs (``reduce-overhead``), which
    allocate in their own pool when they record and nothing per call (the peak would read 0)."""
    return args.memory and not (compile_mode != "none" and args.compiler_mode == "reduce-overhead")


def extra_memory_call(args: argparse.Namespace, compile_mode: str) -> bool:
    """Whether peak memory needs a call of its own: with no warm-up call to measure it in, or compiled
    (a compiling warm-up's allocations are not the method's)."""
    return measures_memory(args, compile_mode) and (compile_mode != "none" or args.warmup == 0)


def planned_cost(run: Run, args: argparse.Namespace, variants: dict[str, int]) -> float:
    """Reference forwards of a whole run, ``variants`` being how many are timed in each of its modes."""
    model, extra = run_cost_model(run), int(extra_memory_call(args, run.compile))
    return sum(
        variants[mode]
        * model.units(px)
        * (args.warmup * call_forwards(mode, run.steps, True) + (args.repeats + extra) * call_forwards(mode, run.steps))
        for mode in run.modes
        for px in run.resolutions
    )


def a_priori_rate(run: Run, args: argparse.Namespace) -> float | None:
    """Seconds per reference forward to expect here before any call: the reference's, scaled to the
    batch and the threads; ``None`` without a reference (another device, dtype or model)."""
    seconds = run_cost_model(run).seconds
    if seconds is None or args.device.type != "cpu" or args.dtype != "float32":
        return None
    return seconds * (args.batch / 2) * REFERENCE_THREADS / torch.get_num_threads()


@dataclass
class Workload:
    """A call to time: one UNet forward, one whole generation or one hires pass, with its inputs already built."""

    mode: str
    resolution: int
    images: int
    steps: int
    call: WorkloadCall
    cost_model: CostModel = DEFAULT_COST

    @property
    def unit(self) -> tuple[str, int]:
        """How times are reported: per UNet forward (the whole guided batch) or per image."""
        return ("s/forward", 1) if self.mode == "unet" else ("s/image", self.images)

    def cost(self, warmup: bool = False) -> float:
        """Reference forwards of one call, for :class:`Estimate`."""
        return call_forwards(self.mode, self.steps, warmup) * self.cost_model.units(self.resolution)


def unet_conditioning(unet: torch.nn.Module, batch: int, resolution: int, generator: torch.Generator) -> dict:
    """Random text conditioning of the UNet's shapes (plus SDXL's pooled text and size ids)."""
    config = unet.config
    device, dtype = unet.device, unet.dtype
    shape = (batch, TEXT_TOKENS, config.cross_attention_dim)
    cond: dict[str, Any] = {"encoder_hidden_states": torch.randn(shape, generator=generator).to(device, dtype)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        # (original size, crop top-left, target size), as the SDXL pipeline builds them.
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn((batch, pooled), generator=generator).to(device, dtype),
            "time_ids": time_ids.repeat(batch, 1).to(device),
        }
    elif config.addition_embed_type is not None:
        raise ValueError(f"UNets with addition_embed_type={config.addition_embed_type!r} are not supported")
    return cond


def unet_workload(
    unet: torch.nn.Module,
    args: argparse.Namespace,
    resolution: int,
    vae_factor: int,
    cost_model: CostModel = DEFAULT_COST,
) -> Workload:
    generator = torch.Generator().manual_seed(SEED)
    latent = resolution // vae_factor
    sample = torch.randn((args.batch, unet.config.in_channels, latent, latent), generator=generator)
    sample = sample.to(unet.device, unet.dtype)
    timestep = torch.tensor(args.timestep, device=unet.device)
    cond = unet_conditioning(unet, args.batch, resolution, generator)

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        torch.manual_seed(SEED)  # tomesd draws its destinations from the global generator
        # ``generate`` is the variant's twin of ``unet``. The sample goes positionally, as pipelines
        # pass it: tomesd's pre-hook reads it from args[0].
        return generate(sample, timestep, **cond)

    return Workload("unet", resolution, args.batch // 2, 1, call, cost_model)


def pipeline_workload(
    pipe: Any, args: argparse.Namespace, resolution: int, steps: int, cost_model: CostModel
) -> Workload:
    images = args.batch // 2

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        torch.manual_seed(SEED)
        return generate(
            prompt=[PROMPT] * images,
            height=resolution,
            width=resolution,
            num_inference_steps=min(steps, WARMUP_STEPS) if warmup else steps,
            guidance_scale=GUIDANCE_SCALE,
            output_type="latent",
            generator=torch.Generator(pipe.device).manual_seed(SEED),
        )

    return Workload("pipeline", resolution, images, steps, call, cost_model)


def hires_steps(steps: int, warmup: bool = False) -> tuple[int, int]:
    """(``num_inference_steps`` to ask for, denoising steps that run) of a hires pass of ``steps`` steps.

    Image-to-image runs ``int(steps * strength)`` of the schedule's steps, its last ones; a warm-up
    asks for just enough steps to run :data:`WARMUP_STEPS` of them.
    """
    run = int(steps * HIRES_STRENGTH)
    if warmup and run > WARMUP_STEPS:
        asked = math.ceil(WARMUP_STEPS / HIRES_STRENGTH)
        return asked, int(asked * HIRES_STRENGTH)
    return steps, run


def hires_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline around ``pipe``'s own modules (SD or SDXL), for the hires pass."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def hires_workload(pipe: Any, args: argparse.Namespace, resolution: int, steps: int, cost_model: CostModel) -> Workload:
    """The hires fix's second pass at ``resolution``: image-to-image at :data:`HIRES_STRENGTH` from a
    first pass's latent at 1 / :data:`HIRES_UPSCALE` of the size, upscaled in latent space (bilinear).

    The first pass's latent is seeded noise of its shape: the time depends on shapes, not values,
    and the first pass is an ordinary generation (``--mode pipeline`` at the smaller size). Image-to-
    image pipelines take a 4-channel ``image`` as latents as they are, so no VAE runs.
    """
    images = args.batch // 2
    side = resolution // pipe.vae_scale_factor // HIRES_UPSCALE
    generator = torch.Generator().manual_seed(SEED)
    first = torch.randn((images, pipe.unet.config.in_channels, side, side), generator=generator)
    latent = torch.nn.functional.interpolate(first, scale_factor=HIRES_UPSCALE, mode="bilinear")
    latent = latent.to(pipe.device, pipe.unet.dtype)

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        torch.manual_seed(SEED)
        return generate(
            prompt=[PROMPT] * images,
            image=latent,
            strength=HIRES_STRENGTH,
            num_inference_steps=hires_steps(steps, warmup)[0],
            guidance_scale=GUIDANCE_SCALE,
            output_type="latent",
            generator=torch.Generator(pipe.device).manual_seed(SEED),
        )

    return Workload("hires", resolution, images, steps, call, cost_model)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory(call: Callable[[], Any], device: torch.device) -> int:
    """Bytes: peak allocated during ``call`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # The raw allocation (+) and free (-) events in time order; their running sum is the memory
    # held by tensors allocated during the call.
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda event: event.start_ns())
    return max(itertools.accumulate((event.nbytes() for event in events), initial=0))


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


def compile_unet(target: Any, mode: str, options: dict[str, Any]) -> None:
    """Compile the UNet of ``target`` (a UNet, or a pipeline's) in place, so that patching reaches the compiled code."""
    unet = getattr(target, "unet", target)
    if mode == "regional":
        unet.compile_repeated_blocks(**options)
    elif mode == "full":
        unet.compile(**options)


def _dynamo_count(group: str, key: str | None = None) -> int:
    """torch._dynamo's running counters: compiled frames (``frames``, ``total``) or graph breaks."""
    from torch._dynamo.utils import counters

    return counters[group][key] if key else sum(counters[group].values())


class Estimate:
    """How long a run takes, adapted to its first call and printed once.

    Costs are reference forwards (:meth:`Workload.cost`). :func:`main` prints the a-priori figure
    before any model is built (:func:`a_priori_rate`: the reference seconds of :data:`COST_MODELS`).
    After the run's first call (a warm-up: eager, it costs what any call of its size costs),
    :meth:`show` prints the figure adapted to it: every later call costed at that call's seconds per
    unit, and the plan's later runs (``later``: their a-priori seconds) at the same pace relative to
    the a-priori one. Every method is costed as the first, the baseline, so a faster method makes
    both figures upper bounds. Compiled runs add, for each method still to compile, the mean
    compile time of those compiled so far (their warm-up calls minus their cost).
    """

    def __init__(self, label: str, total: float, blocks: int, rate: float | None = None, later: float = 0.0) -> None:
        self.label, self.total, self.blocks, self.rate, self.later = label, total, blocks, rate, later
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
        left = (self.total - self.done) * rate + (self.blocks - compiled) * compile_seconds
        compiling = f" + {compile_seconds:.0f} s compiling per method" if compile_seconds else ""
        pace = ""
        if self.rate is not None:
            factor = rate / self.rate
            pace = f"; {factor:.1f}x the a-priori time per forward"
            pace += " (a slower or busier machine than the reference)" if factor > PACE_LIMIT else ""
            pace += f"; the later runs about {_duration(self.later * factor)} at this pace" if self.later else ""
        print(
            f"\nspeed: {self.label}: first call {seconds:.1f} s{compiling}; adapted estimate: about "
            f"{_duration(left)} to go{pace} (later calls scaled by size and steps, every method costed as "
            "the first: an upper bound)",
            file=sys.stderr,
            flush=True,
        )


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, rest = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


# --------------------------------------------------------------------------------------------------
# Noise: the machine's load and the spread of the repeats
# --------------------------------------------------------------------------------------------------

#: A first call this many times slower than the reference's says the machine is slower or busy.
PACE_LIMIT = 1.25


def machine_load() -> float | None:
    """The 1-minute load average (runnable threads, this run's own included), or ``None`` where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def warn_if_busy(when: str, cpus: int) -> None:
    """Say so at once when the machine is busy (``when``: before which calls)."""
    load = machine_load()
    if busy(load, cpus):
        print(
            f"speed: WARNING: load average {load:.1f} on {cpus} CPUs {when}: other work is running; "
            "the timings will be slower and noisier than on a quiet machine",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class Measurement:
    """Raw results of one variant on one workload."""

    seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    compiles: int | None = None
    graph_breaks: int | None = None
    note: str | None = None


def measure(
    workload: Workload,
    target: Any,
    plan: Sequence[Variant],
    args: argparse.Namespace,
    compile_mode: str,
    progress: tqdm,
    estimate: Estimate,
    measured: Callable[[dict[Variant, Measurement]], None] = lambda results: None,
) -> dict[Variant, Measurement]:
    """Warm up, time and measure the memory of every variant on one workload.

    Each variant gets its own :func:`twin` of ``target``, compiled (with ``compile_mode``), applied
    and warmed up once, and stays so for the whole workload. The timed calls then go round the
    variants in turn, in alternating order (forward in even repeats, backward in odd ones), so that
    a drift of a shared machine hits every variant alike, eager or regionally compiled. Compiled,
    a variant that fails ``fullgraph=True`` is compiled again without it, and says so; its compile
    count is that of its timed calls (0 unless it recompiles), its graph breaks those of its own
    compilation.

    Regionally compiled variants share one ``torch._dynamo`` cache, reset first: each compiled
    frame is a whole transformer block, guarded on its class, hooks and processors. Whole-model
    compilation cannot share it: its frames are the UNet's own methods, which every twin runs, and
    the entries a variant with graph breaks leaves there (tomesd's)
    also pass the guards of another twin's calls, which then run split graphs and recompile. So
    each variant runs alone there, on a freshly reset cache, and drift between them is not evened out.

    Peak memory is measured in the last warm-up call of an eager variant (its time only feeds the
    estimate), else in one extra untimed call (:func:`extra_memory_call`). After every timed call
    the machine's load average is recorded, and a busy machine is reported before the timed calls.

    ``measured`` gets the results of the variants done so far after each one that runs alone but the
    last (whole model: a minute of compiling each on a GPU, so a run stopped at its time limit keeps
    those done).
    """
    results = {variant: Measurement() for variant in plan}
    compiled = compile_mode != "none"
    memory_in_warmup = measures_memory(args, compile_mode) and not extra_memory_call(args, compile_mode)
    warmups: list[float] = []  # seconds of every variant's warm-up calls, compiling included

    def call(variant: Variant, generate: Callable[..., Any], what: str, warmup: bool = False) -> float:
        # Shown while the call runs: a whole generation on a CPU can take many minutes.
        progress.set_postfix_str(f"{workload.mode} {workload.resolution}px {variant.name} {what}")
        seconds = timed(lambda: workload.call(generate, warmup), args.device)
        estimate.add(workload.cost(warmup))
        progress.update()
        if warmup:
            warmups.append(seconds)
            if not compiled:
                estimate.show(workload.cost(warmup=True), seconds)
        elif (load := machine_load()) is not None:
            results[variant].loads.append(load)
        return seconds

    def prepare(variant: Variant, ready: ExitStack) -> Callable[..., Any]:
        """The variant applied to its compiled twin and warmed up, left applied in ``ready``."""
        result = results[variant]
        # A method with its own whole-model compile (AgentSD's compile_unet) compiles once patched.
        own_compile = variant.method.compile_whole if compile_mode == "full" else None
        for fullgraph in (True, False):
            model = twin(target)
            if compiled:
                options = compile_options(args.compile_backend, fullgraph, args.compiler_mode)
                if own_compile is None:
                    compile_unet(model, compile_mode, options)
            breaks = _dynamo_count("graph_break")
            try:
                with ExitStack() as attempt:
                    generate = attempt.enter_context(
                        variant.method.applied(model, ratio=variant.ratio, seed=SEED, options=args.options)
                    )
                    if own_compile is not None:
                        own_compile(model, options)
                    what = "warm-up + compile" if compiled else "warm-up"
                    for index in range(args.warmup):
                        if memory_in_warmup and index == args.warmup - 1:
                            warm_up = functools.partial(call, variant, generate, f"{what} + memory", warmup=True)
                            result.peak_bytes = peak_memory(warm_up, args.device)
                        else:
                            call(variant, generate, what, warmup=True)
                    ready.enter_context(attempt.pop_all())
            except torch._dynamo.exc.Unsupported as error:
                if not fullgraph:
                    raise
                result.note = f"fullgraph=True failed ({str(error).splitlines()[0]}); compiled with graph breaks"
                continue
            if compiled:
                result.graph_breaks = _dynamo_count("graph_break") - breaks
            return generate
        raise AssertionError("unreachable: the last attempt returns or raises")

    # Whole-model compilation runs each variant alone on a fresh cache (see the docstring).
    groups = [[variant] for variant in plan] if compile_mode == "full" else [list(plan)]
    prepared = 0
    for group in groups:
        with ExitStack() as ready:
            if compiled:
                torch._dynamo.reset()
            generates = {variant: prepare(variant, ready) for variant in group}
            prepared += len(group)
            for variant in group if compiled else ():
                results[variant].compiles = 0
            warn_if_busy(f"before timing {workload.mode} at {workload.resolution} px", CPUS)
            for repeat in range(args.repeats):
                for variant in group if repeat % 2 == 0 else group[::-1]:
                    frames = _dynamo_count("frames", "total")
                    seconds = call(variant, generates[variant], f"repeat {repeat + 1}/{args.repeats}")
                    results[variant].seconds.append(seconds)
                    if compiled:
                        results[variant].compiles += _dynamo_count("frames", "total") - frames
                        # Compiling: the warm-up calls' seconds beyond what they cost once compiled.
                        rate = seconds / workload.cost()
                        compiling = (sum(warmups) - len(warmups) * workload.cost(True) * rate) / prepared
                        estimate.show(workload.cost(), seconds, compiling, compiled=prepared)
                    else:
                        estimate.show(workload.cost(), seconds)
            if extra_memory_call(args, compile_mode):
                for variant in group:
                    progress.set_postfix_str(f"{workload.mode} {workload.resolution}px {variant.name} memory")
                    call_once = functools.partial(workload.call, generates[variant], False)
                    results[variant].peak_bytes = peak_memory(call_once, args.device)
                    estimate.add(workload.cost())
                    progress.update()
        if len(groups) > 1 and prepared < len(plan):  # after the last, the caller reports the whole workload
            measured({variant: results[variant] for variant in plan[:prepared]})
    return results


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def rows_for(run: Run, workload: Workload, results: dict[Variant, Measurement], baseline_name: str) -> list[Row]:
    unit, per = workload.unit
    base = next(result for variant, result in results.items() if variant.method.name == baseline_name)
    baseline = statistics.median(base.seconds) / per
    # The ceiling (self-attention of the patched blocks for free), where it was timed: how far each
    # method gets from the baseline towards it.
    top = next((statistics.median(r.seconds) / per for v, r in results.items() if v.method.name == "ceiling"), None)
    rows = []
    for variant, result in results.items():
        seconds = [s / per for s in result.seconds]
        median = statistics.median(seconds)
        peak = None if result.peak_bytes is None else result.peak_bytes / workload.images / MIB
        note = result.note
        if workload.mode == "hires" and "agentsd" in variant.method.name.split("+"):
            note = HIRES_RECIPE_NOTE
        rows.append(
            Row(
                source=run.source,
                compile=run.compile,
                mode=workload.mode,
                unit=unit,
                resolution=workload.resolution,
                steps=None if workload.mode == "unet" else workload.steps,
                method=variant.name,
                ratio=variant.ratio,
                baseline=baseline_name,
                median_s=median,
                min_s=min(seconds),
                max_s=max(seconds),
                speedup=baseline / median,
                ceiling_speedup=None if top is None else baseline / top,
                of_the_way=None if top is None or top >= baseline else (baseline - median) / (baseline - top),
                load=max(result.loads, default=None),
                peak_mib_per_image=peak,
                memory_vs_baseline=None if peak is None or not base.peak_bytes else result.peak_bytes / base.peak_bytes,
                compiles=result.compiles,
                graph_breaks=result.graph_breaks,
                note=note,
                seconds=seconds,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def load(run: Run, args: argparse.Namespace) -> tuple[Any, torch.nn.Module, int]:
    """(pipeline or None, UNet, VAE scale factor) for one run; the pipeline only if a mode needs it."""
    dtype = DTYPES[args.dtype]
    if run.model is None:
        arch: Arch = ARCHS[run.arch]
        if run.modes == ("unet",):
            return None, arch.build_unet(args.device, dtype, seed=SEED), 8
        pipe = arch.build_pipeline(args.device, dtype, seed=SEED)
        return pipe, pipe.unet, pipe.vae_scale_factor
    import diffusers

    # diffusers 0.40 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
    dtype_kwarg = "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(run.model, **{dtype_kwarg: dtype})
    except (OSError, ValueError) as error:
        raise SystemExit(f"speed.py: error: argument --model: cannot load {run.model!r}: {error}") from error
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.unet, pipe.vae_scale_factor


def runnable(plan: Sequence[Variant], target: Any, run: Run, args: argparse.Namespace) -> list[Variant]:
    """The variants that apply to ``target``, tried once (apply, remove) before any timed call.

    Some methods refuse some pipelines (CA-ToMe runs only ``StableDiffusionPipeline``), which shows
    only once the model is built: with ``--methods all`` such a method is left out with a note,
    a method named explicitly stops the run with the reason.
    """
    kept = []
    for variant in plan:
        try:
            with variant.method.applied(target, ratio=variant.ratio, seed=SEED, options=args.options):
                pass
        except (TypeError, ValueError) as error:
            if args.methods != [ALL]:
                message = f"speed.py: error: argument --methods: {variant.name} on {run.source}: {error}"
                raise SystemExit(message) from None
            print(f"speed: --methods {ALL} leaves out {variant.name} on {run.source}: {error}", file=sys.stderr)
        else:
            kept.append(variant)
    return kept


def measure_run(
    run: Run,
    args: argparse.Namespace,
    plan: Sequence[Variant],
    report: Callable[[list[Row]], None],
    later: float = 0.0,
) -> list[Row]:
    """Every mode and resolution of one run; ``report`` gets the rows after each workload (and, whole-model
    compiled, after each method).

    ``later``: the a-priori seconds of the plan's later runs, for the adapted estimate (:class:`Estimate`).
    """
    pipe, unet, vae_factor = load(run, args)
    if run.compile != "none":
        # Each compiled method keeps its own cache entries per shape and phase: leave room for them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    targets = {"unet": unet, "pipeline": pipe, "hires": hires_pipeline(pipe) if "hires" in run.modes else None}
    plans = {mode: runnable(timed_in(mode, plan), targets[mode], run, args) for mode in run.modes}
    model = run_cost_model(run)
    builders = {
        "unet": lambda px: unet_workload(unet, args, px, vae_factor, model),
        "pipeline": lambda px: pipeline_workload(pipe, args, px, run.steps, model),
        "hires": lambda px: hires_workload(targets["hires"], args, px, run.steps, model),
    }
    workloads = [builders[mode](px) for mode in run.modes for px in run.resolutions]
    total = planned_cost(run, args, {mode: len(variants) for mode, variants in plans.items()})
    blocks = 0 if run.compile == "none" else sum(len(plans[w.mode]) for w in workloads)
    estimate = Estimate(f"{run.source}, compile {run.compile}", total, blocks, a_priori_rate(run, args), later)
    calls = args.warmup + args.repeats + int(extra_memory_call(args, run.compile))
    rows: list[Row] = []

    def report_so_far(done: dict[Variant, Measurement], workload: Workload) -> None:
        """The rows of the workloads done and of ``workload``'s methods done, once its baseline is."""
        if any(variant.method.name == args.baseline for variant in done):
            report(rows + rows_for(run, workload, done, args.baseline))

    progress = tqdm(total=sum(len(plans[w.mode]) for w in workloads) * calls, unit="call", file=sys.stderr)
    with torch.inference_mode(), progress:
        for workload in workloads:
            target, variants = targets[workload.mode], plans[workload.mode]
            measured = functools.partial(report_so_far, workload=workload)
            results = measure(workload, target, variants, args, run.compile, progress, estimate, measured)
            new = rows_for(run, workload, results, args.baseline)
            for warning in noise_warnings(new, CPUS):
                progress.write(f"speed: WARNING: {warning}", file=sys.stderr)
            rows += new
            # After every workload: an interrupted hours-long CPU run keeps what it measured.
            report(rows)
    return rows


def timed_in(mode: str, plan: Sequence[Variant]) -> list[Variant]:
    """The variants that ``mode`` can time: those with their own denoising loop only in whole generations."""
    return [variant for variant in plan if mode == "pipeline" or not variant.method.needs_pipeline]


def a_priori_seconds(run: Run, args: argparse.Namespace, plan: Sequence[Variant]) -> float | None:
    """The whole run's seconds expected before it starts (every method costed as the baseline), or
    ``None`` without a reference (:func:`a_priori_rate`)."""
    rate = a_priori_rate(run, args)
    if rate is None:
        return None
    return rate * planned_cost(run, args, {mode: len(timed_in(mode, plan)) for mode in run.modes})


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plan = method_variants(args.method_list, args.ratios)
    memory = " + peak memory (in the last warm-up; compiled or without one, in an extra call)" if args.memory else ""
    print(
        f"speed: {args.suite or 'custom'} plan on {args.device} {args.dtype}, batch {args.batch}, "
        f"{', '.join(v.name for v in plan)}; {args.warmup} warm-up + {args.repeats} timed calls each{memory} "
        f"-> {args.out}/speed.{{json,csv,png}}",
        flush=True,
    )
    # Each run with its own calls (a suite's run may time fewer) and methods, and its a-priori seconds.
    runs = []
    for run in args.runs:
        calls = {key: value for key in ("warmup", "repeats") if (value := getattr(run, key)) is not None}
        run_args = argparse.Namespace(**{**vars(args), **calls})
        run_plan = [v for v in plan if v.method.name not in run.skip]
        runs.append((run, run_args, run_plan, a_priori_seconds(run, run_args, run_plan)))
    for run, *_, seconds in runs:
        details = [f"{run.steps} steps"] if run.modes != ("unet",) else []
        details += [f"{key} {value}" for key in ("warmup", "repeats") if (value := getattr(run, key)) is not None]
        details += [f"without {' '.join(run.skip)}"] if run.skip else []
        details += ["no a-priori estimate" if seconds is None else f"about {_duration(seconds)} a priori"]
        print(
            f"  {run.source}: {'+'.join(run.modes)}, {' '.join(map(str, run.resolutions))} px, compile {run.compile}"
            + "".join(f", {detail}" for detail in details),
            flush=True,
        )
    known = [seconds for *_, seconds in runs if seconds is not None]
    if known:
        print(
            f"speed: estimate a priori: about {_duration(sum(known))}"
            + ("" if len(known) == len(runs) else " for the runs with a reference")
            + f" on a quiet {REFERENCE_THREADS}-core CPU like the reference's (scaled to {torch.get_num_threads()} "
            "threads), every method costed as the baseline (an upper bound); each run re-estimates after its "
            "first call",
            flush=True,
        )
    warn_if_busy("before the first run", CPUS)
    meta = {
        "args": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
        **machine_info(args.device, sys.argv[1:] if argv is None else argv),
    }
    meta["args"].update(runs=[asdict(run) for run in args.runs], method_list=[m.name for m in args.method_list])
    meta["args"]["options"] = asdict(args.options)
    title = f"{args.device.type} {args.dtype}, batch {args.batch}"

    rows: list[Row] = []
    for index, (run, run_args, run_plan, _) in enumerate(runs):
        done = list(rows)
        later = sum(seconds or 0.0 for *_, seconds in runs[index + 1 :])
        report = functools.partial(lambda new, done: write_outputs(args.out, meta, done + new, title), done=done)
        rows += measure_run(run, run_args, run_plan, report, later)
        gc.collect()  # free this run's model before the next one is built
        if args.device.type == "cuda":
            torch.cuda.empty_cache()

    print(format_table(rows))
    for warning in noise_warnings(rows, CPUS):
        print(f"WARNING: {warning}")
    print(f"peak memory: {meta['memory_source']}; written {args.out}/speed.json, speed.csv, speedup.png")
    return rows


if __name__ == "__main__":
    main()
