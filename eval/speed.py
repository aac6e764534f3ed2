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
  Methods that need the pipeline's own loop (DeepCache, T-GATE) cannot run here. With ``--arch
  sd35-medium|pixart-sigma|flux`` the model is a diffusion transformer (``transformer_configs.py``),
  its inputs those its pipeline gives one forward (Flux: one row per image, guidance-distilled).
* ``pipeline``: a whole guided generation of ``--steps`` steps, in seconds per image (``batch / 2``
  images per call), through the method's own call (DeepCache and T-GATE run their loops). With
  ``--arch`` the pipeline is a real diffusers pipeline around the full-size random-weight UNet with
  toy text encoders and VAE (``unet_configs.Arch.build_pipeline``); with ``--model`` the real one.
  Both run with ``output_type="latent"``: the VAE decode is no method's business.
* ``hires``: the hires fix's second pass, in seconds per image: image-to-image at ``--resolutions``
  and strength 0.5 from a latent of half the size upscaled 2x, ``int(steps * 0.5)`` steps. AgentSD's
  recipe switches phase by noise level (agent phase for t >= 0.6 T), so it runs its ToMe phase only
  there, and its rows say so.

Every method comes from the one registry, ``eval/methods.py``. This file is the command line and
the run loop; the parts are modules of their own, next to it:

* ``suites.py``: the runs and suites, as data;
* ``settings.py``: what the flags come to (:class:`settings.SpeedSettings`);
* ``workloads.py``: the calls timed, with their seeded inputs, and the cost model of the estimates;
* ``measure.py``: warm-ups, timed calls and peak memory, fair by construction (twins of one model,
  methods interleaved in alternating order; its docstring says how compiled methods run);
* ``timing.py``: the one timing helper (synchronize, time, peak memory, the machine's load);
* ``estimate.py``: how long a run takes, a priori and adapted to the first call;
* ``speed_report.py``: the rows, the table, the noise warnings and speed.json / speed.csv / speedup.png.

Timings are only as good as the machine is quiet: the load average is read before and after every
timed call, and a load above the CPU count, or timed calls of one method spreading over 10% of
their median, end the output with a warning (``speed_report.noise_warnings``). When the ceiling is
timed, every row says how far it gets from the baseline towards it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# Sibling script modules: eval/ is sys.path[0] when this file runs as a script.
import flag_types  # isort: skip
import timing  # isort: skip
from estimate import Estimate, a_priori_rate, a_priori_seconds, planned_cost, print_plan  # isort: skip
from measure import Measurement, measure  # isort: skip
from methods import METHODS, Method, Variant, add_method_arguments, options_from, resolve_methods  # isort: skip
from methods import variants as method_variants  # isort: skip
from settings import ALL, PlannedRun, SpeedSettings  # isort: skip
from shared import DTYPES, HelpFormatter  # isort: skip
from speed_report import Row, format_table, noise_warnings, rows_for, run_record, write_outputs  # isort: skip
from suites import COMPILE_MODES, MODES, SUITES, timed_in  # isort: skip
from transformer_configs import FLUX_BLOCKS, TRANSFORMER_ARCHS  # isort: skip
from unet_configs import ARCHS  # isort: skip
from video import VIDEO_UNETS  # isort: skip
from workloads import HIRES_STRENGTH, HIRES_UPSCALE, SEED, WARMUP_STEPS  # isort: skip
from workloads import Workload, hires_pipeline, hires_steps, load_models, run_workloads  # isort: skip

#: diffusers release that added ``ModelMixin.compile_repeated_blocks`` and the UNet's ``_repeated_blocks``.
REGIONAL_DIFFUSERS = "0.35"

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


def build_parser() -> argparse.ArgumentParser:
    suites = "\n".join(
        textwrap.fill(f"{name}: {suite.summary}", 100, initial_indent="  ", subsequent_indent="    ")
        for name, suite in SUITES.items()
    )
    parser = argparse.ArgumentParser(
        description="Seconds per UNet forward / per image and peak memory of the registered methods.",
        formatter_class=HelpFormatter,
        epilog=f"suites (--suite NAME; flags given next to it override its settings):\n{suites}\n\n"
        f"--methods {ALL} (the default): every registered method that runs in the chosen --mode and is installed.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--arch",
        choices=sorted({**ARCHS, **TRANSFORMER_ARCHS}),
        help="full-size architecture with random weights; sd15 when neither --arch nor --model is given. "
        f"UNets: {', '.join(ARCHS)}; diffusion transformers (one forward, eager): {', '.join(TRANSFORMER_ARCHS)}",
    )
    source.add_argument("--model", help="a text-to-image diffusers pipeline instead: hub id or local folder")
    parser.add_argument("--suite", choices=sorted(SUITES), help="a named plan of runs (see below)")
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="unet",
        help="unet: one forward of the UNet (or diffusion transformer); pipeline: a whole generation; "
        "hires: the hires fix's second pass "
        f"(image-to-image at {HIRES_STRENGTH:g} strength of a {HIRES_UPSCALE}x-upscaled latent, at --resolutions, "
        "int(steps * strength) steps); both: unet then pipeline",
    )
    parser.add_argument(
        "--resolutions",
        type=flag_types.resolution,
        nargs="+",
        default=[512, 768, 1024],
        metavar="PX",
        help="image sizes",
    )
    add_method_arguments(parser, default=[ALL])
    parser.add_argument(
        "--baseline", default="sd", metavar="NAME", help="the method every speed-up and memory ratio is relative to"
    )
    parser.add_argument(
        "--ratios",
        type=flag_types.ratio,
        nargs="+",
        default=[0.4],
        metavar="R",
        help="merge ratios of the merging methods",
    )
    parser.add_argument("--steps", type=flag_types.int_at_least(1), default=50, help="denoising steps (pipeline mode)")
    parser.add_argument(
        "--flux-blocks",
        type=flag_types.int_at_least(0),
        nargs=2,
        default=list(FLUX_BLOCKS),
        metavar=("DOUBLE", "SINGLE"),
        help="double- and single-stream blocks of --arch flux (FLUX.1-dev has 19 and 38, 48 GB in float32)",
    )
    parser.add_argument(
        "--batch",
        type=flag_types.int_at_least(2),
        default=2,
        help="UNet batch, even: the guided pair of batch/2 images",
    )
    parser.add_argument(
        "--timestep", type=flag_types.timestep, default=981, help="timestep of the UNet forward (unet mode)"
    )
    parser.add_argument("--repeats", type=flag_types.int_at_least(1), default=5, help="timed calls per method")
    parser.add_argument(
        "--warmup",
        type=flag_types.int_at_least(0),
        default=1,
        help=f"untimed calls per method first (pipeline mode: {WARMUP_STEPS}-step generations)",
    )
    parser.add_argument("--device", type=flag_types.device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda, float32 on cpu"
    )
    parser.add_argument(
        "--threads", type=flag_types.int_at_least(1), default=None, help="torch CPU threads (default: torch's)"
    )
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


def _plan_runs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[PlannedRun, ...]:
    if args.suite is None:
        modes = ("unet", "pipeline") if args.mode == "both" else (args.mode,)
        arch = None if args.model else args.arch or "sd15"
        if arch in ARCHS and ARCHS[arch].unet_class.__name__ in VIDEO_UNETS and modes != ("unet",):
            parser.error(f"argument --arch: {arch} (a video UNet, random weights) is timed in --mode unet only")
        return (PlannedRun(arch, args.model, modes, tuple(dict.fromkeys(args.resolutions)), args.compile, args.steps),)
    given = [flag for flag, dest in _RUN_FLAGS if getattr(args, dest) != parser.get_default(dest)]
    if given:
        parser.error(f"argument --suite: {args.suite} sets {', '.join(given)} itself; drop {' '.join(given)}")
    return SUITES[args.suite].runs


def _plan_methods(
    args: argparse.Namespace, runs: Sequence[PlannedRun], parser: argparse.ArgumentParser
) -> list[Method]:
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


def parse_args(argv: Sequence[str] | None = None) -> SpeedSettings:
    """Parse and cross-check the flags; every error is raised here, before any model is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = _plan_runs(args, parser)
    if args.suite is not None:
        parser.set_defaults(**SUITES[args.suite].settings)
        args = parser.parse_args(argv)
    methods = _plan_methods(args, runs, parser)
    try:
        options = options_from(args)
    except ValueError as error:
        parser.error(f"argument {error}")
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
    if transformers := sorted({run.arch for run in runs if run.arch in TRANSFORMER_ARCHS}):
        if {mode for run in runs if run.arch in transformers for mode in run.modes} != {"unet"}:
            parser.error(f"argument --mode: --arch {' '.join(transformers)} runs one forward only: use --mode unet")
        if compiled:
            parser.error(f"argument --compile: --arch {' '.join(transformers)} runs eager only: drop --compile")
    if sum(args.flux_blocks) < 1:
        parser.error("argument --flux-blocks: give at least one block (DOUBLE SINGLE, e.g. 1 1)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a folder")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = {
        "device": device,
        "dtype": args.dtype or ("float16" if device.type == "cuda" else "float32"),
        "ratios": list(dict.fromkeys(args.ratios)),
    }
    # The flags that are settings as they are; the rest are checked or resolved above.
    as_given = ("baseline", "batch", "timestep", "warmup", "repeats", "memory", "threads", "compile_backend")
    as_given += ("compiler_mode", "out", "suite")
    return SpeedSettings(
        runs=runs,
        methods=tuple(methods),
        every_method=args.methods == [ALL],
        ratios=tuple(resolved["ratios"]),
        flux_blocks=tuple(args.flux_blocks),
        device=device,
        dtype=resolved["dtype"],
        options=options,
        flags={**vars(args), **resolved},
        **{name: getattr(args, name) for name in as_given},
    )


# --------------------------------------------------------------------------------------------------
# The run loop
# --------------------------------------------------------------------------------------------------


def runnable(plan: Sequence[Variant], target: Any, run: PlannedRun, settings: SpeedSettings) -> list[Variant]:
    """The variants that apply to ``target``, tried once (apply, remove) before any timed call.

    Some methods refuse some pipelines (CA-ToMe runs only ``StableDiffusionPipeline``), which shows
    only once the model is built: with ``--methods all`` such a method is left out with a note,
    a method named explicitly stops the run with the reason.
    """
    kept = []
    for variant in plan:
        try:
            with variant.method.applied(target, ratio=variant.ratio, seed=SEED, options=settings.options):
                pass
        except (TypeError, ValueError) as error:
            if not settings.every_method:
                message = f"speed.py: error: argument --methods: {variant.name} on {run.source}: {error}"
                raise SystemExit(message) from None
            print(f"speed: --methods {ALL} leaves out {variant.name} on {run.source}: {error}", file=sys.stderr)
        else:
            kept.append(variant)
    return kept


def measure_run(
    run: PlannedRun,
    settings: SpeedSettings,
    plan: Sequence[Variant],
    report: Callable[[list[Row]], None],
    later: float = 0.0,
) -> list[Row]:
    """Every mode and resolution of one run; ``report`` gets the rows after each workload (and, whole-model
    compiled, after each method).

    ``later``: the a-priori seconds of the plan's later runs, for the adapted estimate (:class:`Estimate`).
    """
    pipe, unet, vae_factor = load_models(run, settings)
    if run.compile != "none":
        # Each compiled method keeps its own cache entries per shape and phase: leave room for them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    targets = {"unet": unet, "pipeline": pipe, "hires": hires_pipeline(pipe) if "hires" in run.modes else None}
    plans = {mode: runnable(timed_in(mode, plan), targets[mode], run, settings) for mode in run.modes}
    workloads = run_workloads(run, settings, pipe, unet, targets["hires"], vae_factor)
    total = planned_cost(run, settings, {mode: len(variants) for mode, variants in plans.items()})
    compilations = 0 if run.compile == "none" else sum(len(plans[w.mode]) for w in workloads)
    rate = a_priori_rate(run, settings)
    estimate = Estimate(f"{run.source}, compile {run.compile}", total, compilations, rate, later)
    calls = settings.warmup + settings.repeats + int(settings.extra_memory_call(run.compile))
    rows: list[Row] = []

    def report_so_far(done: dict[Variant, Measurement], workload: Workload) -> None:
        """The rows of the workloads done and of ``workload``'s methods done, once its baseline is."""
        if any(variant.method.name == settings.baseline for variant in done):
            report(rows + rows_for(run, workload, done, settings.baseline))

    progress = tqdm(total=sum(len(plans[w.mode]) for w in workloads) * calls, unit="call", file=sys.stderr)
    with torch.inference_mode(), progress:
        for workload in workloads:
            target, variants = targets[workload.mode], plans[workload.mode]
            measured = functools.partial(report_so_far, workload=workload)
            results = measure(workload, target, variants, settings, run.compile, progress, estimate, measured)
            new = rows_for(run, workload, results, settings.baseline)
            for warning in noise_warnings(new, timing.CPUS):
                progress.write(f"speed: WARNING: {warning}", file=sys.stderr)
            rows += new
            # After every workload: an interrupted hours-long CPU run keeps what it measured.
            report(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    settings = parse_args(argv)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    plan = method_variants(settings.methods, settings.ratios)
    # Each run with its own calls (a suite's run may time fewer) and methods, and its a-priori seconds.
    runs = []
    for run in settings.runs:
        run_settings = settings.for_run(run)
        run_plan = [v for v in plan if v.method.name not in run.skip]
        runs.append((run, run_settings, run_plan, a_priori_seconds(run, run_settings, run_plan)))
    print_plan(settings, plan, runs)
    timing.warn_if_busy("speed", "before the first run")
    meta = run_record(settings, argv)
    title = f"{settings.device.type} {settings.dtype}, batch {settings.batch}"

    rows: list[Row] = []
    for index, (run, run_settings, run_plan, _) in enumerate(runs):
        done = list(rows)
        later = sum(seconds or 0.0 for *_, seconds in runs[index + 1 :])
        report = functools.partial(lambda new, done: write_outputs(settings.out, meta, done + new, title), done=done)
        rows += measure_run(run, run_settings, run_plan, report, later)
        gc.collect()  # free this run's model before the next one is built
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()

    print(format_table(rows))
    for warning in noise_warnings(rows, timing.CPUS):
        print(f"WARNING: {warning}")
    print(f"peak memory: {meta['memory_source']}; written {settings.out}/speed.json, speed.csv, speedup.png")
    return rows


if __name__ == "__main__":
    main()
