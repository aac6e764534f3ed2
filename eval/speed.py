"""Speed and memory of AgentSD against the SDPA baseline and the other registered methods.

Run, with the package installed (``pip install -e ".[eval]"``), e.g.::

    python eval/speed.py --suite quick                  # about two minutes on 2 CPU cores
    python eval/speed.py --arch sd15 --resolutions 512 768 1024 --mode unet
    python eval/speed.py --arch sd15 --mode pipeline --steps 20 --methods deepcache agentsd+deepcache sd
    python eval/speed.py --suite gpu                    # one GPU, fp16, at most 8 minutes

Two measurements, chosen with ``--mode``:

* ``unet``: one UNet forward on the classifier-free-guidance batch (``--batch``, 2 by default),
  random latents of ``resolution / vae_scale_factor`` and random text embeddings, at a fixed
  ``--timestep`` (981 by default, inside the recipe's agent phase). Reported in seconds per forward.
  Methods that need the pipeline's own loop (DeepCache, T-GATE) cannot run here.
* ``pipeline``: a whole guided generation of ``--steps`` steps, in seconds per image (``batch / 2``
  images per call), through the method's own call (DeepCache and T-GATE run their loops). With
  ``--arch`` the pipeline is a real diffusers pipeline around the full-size random-weight UNet with
  toy text encoders and VAE (``unet_configs.Arch.build_pipeline``); with ``--model`` the real one.
  Both run with ``output_type="latent"``: the VAE decode is no method's business.

Every method comes from the one registry, ``eval/methods.py``. Fairness is built in: the same
weights, seeded inputs, seeds and settings for every method, warm-up calls before timing, and
methods interleaved within each repeat, in alternating order (forward in even repeats, backward in
odd ones) so that a drift of a shared machine during a repeat hits every method alike; medians are
shown with their min-max. Each method runs on its own twin of the model (new modules around the
same weight tensors), compiled (``--compile regional|full``), patched and warmed up once, so that
regionally compiled methods are interleaved too; whole-model compiled ones run one after another,
each on a fresh ``torch._dynamo`` cache (see :func:`measure`). The reported compile count of the
timed calls shows whether a method recompiles.

Peak memory is measured in one extra untimed call per method and resolution: the peak of the
memory allocated during the call above what was allocated before it (weights and inputs excluded),
divided by the images in the call. On CUDA it comes from torch's allocator statistics; on CPU from
the allocation and free events that ``torch.profiler`` records for torch tensors (memory allocated
outside torch's allocator, such as oneDNN scratch space, is not seen).

Before the first timed call the script prints how long the run will take: the first call's
seconds, scaled to every later call by a cost model (see :class:`Estimate`).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import itertools
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

# Sibling script modules: eval/ is sys.path[0] when this file runs as a script.
from methods import METHODS, Method, Variant, add_method_arguments, options_from, resolve_methods  # noqa: E402 isort: skip
from methods import variants as method_variants  # noqa: E402 isort: skip
from speed_report import Row, format_table, machine_info, write_outputs  # noqa: E402 isort: skip
from unet_configs import ARCHS, TEXT_TOKENS, Arch  # noqa: E402 isort: skip

MODES = ("unet", "pipeline")
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
PROMPT = "a high quality photograph of a corgi"
MIB = 2**20


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


#: What the GPU suite compares: the baseline, tomesd, AgentSD's recipe and its two phases, and the
#: ceiling (patched blocks skip self-attention: the most any merging of that level could gain).
GPU_METHODS = ("sd", "tomesd", "agentsd", "agent-phase", "tome-phase", "ceiling")
#: One forward at t = 981 is the recipe's agent phase: the recipe is timed over whole generations,
#: its two phases on one forward each.
_FORWARD_SKIPS = ("agentsd",)
_GENERATION_SKIPS = ("agent-phase", "tome-phase")

# Cheapest and most asked-for first: every run's rows are written when it ends, so a run stopped
# at the time limit keeps what it measured.
_GPU_RUNS = (
    Run("sd15", None, ("unet",), (512, 768, 1024), skip=_FORWARD_SKIPS),
    Run("sdxl", None, ("unet",), (1024,), skip=_FORWARD_SKIPS),
    Run("sd15", None, ("unet",), (1024,), compile="regional", skip=_FORWARD_SKIPS),
    Run("sd15", None, ("pipeline",), (512, 1024), steps=20, skip=_GENERATION_SKIPS, warmup=1, repeats=3),
    Run("sdxl", None, ("unet",), (1024,), compile="regional", skip=_FORWARD_SKIPS),
)

SUITES: dict[str, Suite] = {
    "quick": Suite(
        "SD 1.5 architecture, one UNet forward at 512 px: sd, tomesd and AgentSD's two phases, "
        "1 warm-up + 2 timed calls each, no memory call (about 2 min on 2 CPU cores)",
        {"methods": ["sd", "tomesd", "agent-phase", "tome-phase"], "warmup": 1, "repeats": 2, "memory": False},
        (Run("sd15", None, ("unet",), (512,)),),
    ),
    "gpu": Suite(
        "one GPU, fp16, batch 2, in about 7 min: one forward of the SD 1.5 architecture at 512/768/1024 px "
        "and of SDXL at 1024 px, eager and (1024 px) regionally compiled: sd, tomesd, AgentSD's two phases, "
        "ceiling, median of 15 after 3 warm-ups; a 20-step generation at 512/1024 px: sd, tomesd, AgentSD's "
        "recipe, ceiling, median of 3; peak memory",
        {"methods": list(GPU_METHODS), "dtype": "float16", "warmup": 3, "repeats": 15, "memory": True},
        _GPU_RUNS,
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
        help="unet: one UNet forward; pipeline: a whole generation; both: one then the other",
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
        "full: torch.compile of the whole UNet (a bare --compile); dynamic=False, each method on its own twin",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend ('eager' checks tracing only)"
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
        modes = MODES if args.mode == "both" else (args.mode,)
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
            "forward: use --mode pipeline (or both)"
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


@dataclass
class Workload:
    """A call to time: one UNet forward or one whole generation, with its inputs already built."""

    mode: str
    resolution: int
    images: int
    steps: int
    call: WorkloadCall

    @property
    def unit(self) -> tuple[str, int]:
        """How times are reported: per UNet forward (the whole guided batch) or per image."""
        return ("s/forward", 1) if self.mode == "unet" else ("s/image", self.images)

    def cost(self, warmup: bool = False) -> float:
        """Relative cost of one call, for :class:`Estimate`: UNet forwards of this size."""
        forwards = 1 if self.mode == "unet" else min(self.steps, WARMUP_STEPS) if warmup else self.steps
        return forwards * forward_cost(self.resolution)


def forward_cost(resolution: int) -> float:
    """A UNet forward's cost relative to one at 512 px: ``0.8 p + 0.2 p**2``, p = pixels / 512**2.

    Convolutions and projections grow with the pixels, attention with their square; the weights
    fit SD 1.5 forwards on a CPU (10.2, 28.4 and 68.4 s at 512, 768 and 1024 px: model 1, 2.8, 6.4).
    """
    pixels = (resolution / 512) ** 2
    return 0.8 * pixels + 0.2 * pixels**2


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


def unet_workload(unet: torch.nn.Module, args: argparse.Namespace, resolution: int, vae_factor: int) -> Workload:
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

    return Workload("unet", resolution, args.batch // 2, 1, call)


def pipeline_workload(pipe: Any, args: argparse.Namespace, resolution: int, steps: int) -> Workload:
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

    return Workload("pipeline", resolution, images, steps, call)


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


def compile_unet(target: Any, mode: str, backend: str, fullgraph: bool) -> None:
    """Compile the UNet of ``target`` (a UNet, or a pipeline's) in place, so that patching reaches the compiled code."""
    unet = getattr(target, "unet", target)
    if mode == "regional":
        unet.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False, backend=backend)
    elif mode == "full":
        unet.compile(fullgraph=fullgraph, dynamic=False, backend=backend)


def _dynamo_count(group: str, key: str | None = None) -> int:
    """torch._dynamo's running counters: compiled frames (``frames``, ``total``) or graph breaks."""
    from torch._dynamo.utils import counters

    return counters[group][key] if key else sum(counters[group].values())


class Estimate:
    """How long a run takes, printed once, from its first timed call and a cost model.

    Each call's cost is :meth:`Workload.cost` (UNet forwards of its size, :func:`forward_cost`);
    the first timed call gives the seconds per unit, and every later call is costed at that rate,
    every method alike (so a method faster than the first one makes the figure an upper bound).
    Compiled runs add, for each method still to compile, the mean compile time of those compiled
    so far (their warm-up calls minus their cost).
    """

    def __init__(self, label: str, total: float, blocks: int) -> None:
        self.label, self.total, self.blocks = label, total, blocks
        self.done = 0.0
        self.shown = False

    def add(self, cost: float) -> None:
        self.done += cost

    def show(self, cost: float, seconds: float, compile_seconds: float = 0.0, compiled: int = 0) -> None:
        """After a call of ``cost`` units took ``seconds``; ``compiled`` methods took ``compile_seconds`` each."""
        if self.shown:
            return
        self.shown = True
        left = (self.total - self.done) * seconds / cost + (self.blocks - compiled) * compile_seconds
        compiling = f" + {compile_seconds:.0f} s compiling per method" if compile_seconds else ""
        print(
            f"\nspeed: {self.label}: first call {seconds:.1f} s{compiling}; about {_duration(left)} to go "
            "(later calls scaled by size and steps, every method costed as the first)",
            file=sys.stderr,
            flush=True,
        )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


@dataclass
class Measurement:
    """Raw results of one variant on one workload."""

    seconds: list[float] = field(default_factory=list)
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
    the entries a variant with graph breaks leaves there (tomesd, or AgentSD's one break per call)
    also pass the guards of another twin's calls, which then run split graphs and recompile. So
    each variant runs alone there, on a freshly reset cache, and drift between them is not evened out.
    """
    results = {variant: Measurement() for variant in plan}
    compiled = compile_mode != "none"
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
        return seconds

    def prepare(variant: Variant, ready: ExitStack) -> Callable[..., Any]:
        """The variant applied to its compiled twin and warmed up, left applied in ``ready``."""
        result = results[variant]
        for fullgraph in (True, False) if compile_mode == "regional" else (False,):
            model = twin(target)
            if compiled:
                compile_unet(model, compile_mode, args.compile_backend, fullgraph)
            breaks = _dynamo_count("graph_break")
            try:
                with ExitStack() as attempt:
                    generate = attempt.enter_context(
                        variant.method.applied(model, ratio=variant.ratio, seed=SEED, options=args.options)
                    )
                    what = "warm-up + compile" if compiled else "warm-up"
                    for _ in range(args.warmup):
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
            if args.memory:
                for variant in group:
                    progress.set_postfix_str(f"{workload.mode} {workload.resolution}px {variant.name} memory")
                    call_once = functools.partial(workload.call, generates[variant], False)
                    results[variant].peak_bytes = peak_memory(call_once, args.device)
                    estimate.add(workload.cost())
                    progress.update()
    return results


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def rows_for(run: Run, workload: Workload, results: dict[Variant, Measurement], baseline_name: str) -> list[Row]:
    unit, per = workload.unit
    base = next(result for variant, result in results.items() if variant.method.name == baseline_name)
    baseline = statistics.median(base.seconds) / per
    rows = []
    for variant, result in results.items():
        seconds = [s / per for s in result.seconds]
        median = statistics.median(seconds)
        peak = None if result.peak_bytes is None else result.peak_bytes / workload.images / MIB
        rows.append(
            Row(
                source=run.source,
                compile=run.compile,
                mode=workload.mode,
                unit=unit,
                resolution=workload.resolution,
                steps=workload.steps if workload.mode == "pipeline" else None,
                method=variant.name,
                ratio=variant.ratio,
                baseline=baseline_name,
                median_s=median,
                min_s=min(seconds),
                max_s=max(seconds),
                speedup=baseline / median,
                peak_mib_per_image=peak,
                memory_vs_baseline=None if peak is None or not base.peak_bytes else result.peak_bytes / base.peak_bytes,
                compiles=result.compiles,
                graph_breaks=result.graph_breaks,
                note=result.note,
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
        if "pipeline" not in run.modes:
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
    run: Run, args: argparse.Namespace, plan: Sequence[Variant], report: Callable[[list[Row]], None]
) -> list[Row]:
    """Every mode and resolution of one run; ``report`` gets the rows after each workload."""
    pipe, unet, vae_factor = load(run, args)
    if run.compile != "none":
        # Each compiled method keeps its own cache entries per shape and phase: leave room for them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    plans = {
        mode: runnable([v for v in plan if mode == "pipeline" or not v.method.needs_pipeline], target, run, args)
        for mode, target in ((mode, unet if mode == "unet" else pipe) for mode in run.modes)
    }
    calls = args.warmup + args.repeats + int(args.memory)
    workloads = [
        unet_workload(unet, args, px, vae_factor) if mode == "unet" else pipeline_workload(pipe, args, px, run.steps)
        for mode in run.modes
        for px in run.resolutions
    ]
    total = sum(len(plans[w.mode]) * (args.warmup * w.cost(True) + (calls - args.warmup) * w.cost()) for w in workloads)
    blocks = 0 if run.compile == "none" else sum(len(plans[w.mode]) for w in workloads)
    estimate = Estimate(f"{run.source}, compile {run.compile}", total, blocks)
    rows: list[Row] = []
    progress = tqdm(total=sum(len(plans[w.mode]) for w in workloads) * calls, unit="call", file=sys.stderr)
    with torch.inference_mode(), progress:
        for workload in workloads:
            target = unet if workload.mode == "unet" else pipe
            results = measure(workload, target, plans[workload.mode], args, run.compile, progress, estimate)
            rows += rows_for(run, workload, results, args.baseline)
            # After every workload: an interrupted hours-long CPU run keeps what it measured.
            report(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plan = method_variants(args.method_list, args.ratios)
    calls = f"{args.warmup} warm-up + {args.repeats} timed calls" + (" + 1 memory call" if args.memory else "")
    print(
        f"speed: {args.suite or 'custom'} plan on {args.device} {args.dtype}, batch {args.batch}, "
        f"{', '.join(v.name for v in plan)}; {calls} each -> {args.out}/speed.{{json,csv,png}}",
        flush=True,
    )
    for run in args.runs:
        details = [f"{run.steps} steps"] if "pipeline" in run.modes else []
        details += [f"{key} {value}" for key in ("warmup", "repeats") if (value := getattr(run, key)) is not None]
        details += [f"without {' '.join(run.skip)}"] if run.skip else []
        print(
            f"  {run.source}: {'+'.join(run.modes)}, {' '.join(map(str, run.resolutions))} px, compile {run.compile}"
            + "".join(f", {detail}" for detail in details),
            flush=True,
        )
    meta = {
        "args": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
        **machine_info(args.device, sys.argv[1:] if argv is None else argv),
    }
    meta["args"].update(runs=[asdict(run) for run in args.runs], method_list=[m.name for m in args.method_list])
    meta["args"]["options"] = asdict(args.options)
    title = f"{args.device.type} {args.dtype}, batch {args.batch}"

    rows: list[Row] = []
    for run in args.runs:
        done = list(rows)
        calls = {key: value for key in ("warmup", "repeats") if (value := getattr(run, key)) is not None}
        run_args = argparse.Namespace(**{**vars(args), **calls})
        run_plan = [v for v in plan if v.method.name not in run.skip]
        report = functools.partial(lambda new, done: write_outputs(args.out, meta, done + new, title), done=done)
        rows += measure_run(run, run_args, run_plan, report)
        gc.collect()  # free this run's model before the next one is built
        if args.device.type == "cuda":
            torch.cuda.empty_cache()

    print(format_table(rows))
    print(f"peak memory: {meta['memory_source']}; written {args.out}/speed.json, speed.csv, speedup.png")
    return rows


if __name__ == "__main__":
    main()
