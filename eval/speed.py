"""Speed and memory of AgentSD against the SDPA baseline and ToMeSD.

Run, with the package installed (``pip install -e ".[eval]"``), e.g.::

    python eval/speed.py --arch sd15 --resolutions 512 768 1024 --mode unet
    python eval/speed.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --mode pipeline

Two measurements, chosen with ``--mode``:

* ``unet``: one UNet forward on the classifier-free-guidance batch (``--batch``, 2 by default),
  random latents of ``resolution / vae_scale_factor`` and random text embeddings, at a fixed
  ``--timestep`` (981 by default, inside the recipe's agent phase). Reported in seconds per forward.
* ``pipeline``: a whole guided generation of ``--steps`` steps, recipe included, in seconds per
  image (``batch / 2`` images per call). With ``--arch`` the denoising loop runs here (scheduler of
  the published pipeline, random text embeddings, no text encoder and no VAE: neither is patched);
  with ``--model`` the real pipeline runs with ``output_type="latent"`` (text encoding included, VAE
  decode left out for the same reason).

Fairness is built in: one UNet instance, the same seeded inputs and settings for every method,
warm-up calls before timing, and methods interleaved within each repeat (patch, time, unpatch) so
that drifts of a shared machine hit them all alike. With ``--compile`` each method instead runs as
one block on a freshly reset ``torch._dynamo`` (patched once, warmed up, timed), so that the
reported compile count of the timed calls shows whether a method recompiles at every step.

Peak memory is measured in one extra untimed call per method and resolution: the peak of the
memory allocated during the call above what was allocated before it (weights and inputs excluded),
divided by the images in the call. On CUDA it comes from torch's allocator statistics; on CPU from
the allocation and free events that ``torch.profiler`` records for torch tensors (memory allocated
outside torch's allocator, such as oneDNN scratch space, is not seen).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import tomesd
import torch
from packaging.version import Version
from tqdm import tqdm

import agentsd

# Sibling script modules: eval/ is sys.path[0] when this file runs as a script.
from atomic_write import atomic_path  # isort: skip
from unet_configs import ARCHS, Arch  # isort: skip

METHODS = ("sd", "tomesd", "agentsd", "agent-phase", "tome-phase")
MODES = ("unet", "pipeline")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The two phases of the published recipe, each run alone for all steps.
AGENTSD_KWARGS: dict[str, dict[str, Any]] = {
    "agentsd": {},
    "agent-phase": {"schedule": "fixed", "sx": 4, "sy": 4, "agent_ratio": 0.95},
    "tome-phase": {"schedule": "fixed", "sx": 2, "sy": 2, "agent_ratio": 0.5},
}

SEED = 0
TEXT_TOKENS = 77
GUIDANCE_SCALE = 7.5
PROMPT = "a high quality photograph of a corgi"
MIB = 2**20
MEMORY_SOURCES = {"cuda": "torch.cuda allocator statistics", "cpu": "torch.profiler tensor events"}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Seconds per UNet forward / per image and peak memory of sd, tomesd and agentsd.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=sorted(ARCHS), help="random-weight architecture (default sd15)")
    source.add_argument("--model", help="text-to-image diffusers pipeline: hub id or local folder")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="unet")
    parser.add_argument("--resolutions", type=_resolution, nargs="+", default=[512, 768, 1024], metavar="PX")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--ratios", type=_ratio, nargs="+", default=[0.4], metavar="R", help="merge ratios of every method but sd"
    )
    parser.add_argument("--steps", type=_int_at_least(1), default=50, help="denoising steps (pipeline mode)")
    parser.add_argument(
        "--batch", type=_int_at_least(2), default=2, help="UNet batch, even: the guided pair of batch/2 images"
    )
    parser.add_argument("--timestep", type=_timestep, default=981, help="timestep of the UNet forward (unet mode)")
    parser.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed calls per method")
    parser.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed calls per method first")
    parser.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda, float32 on cpu"
    )
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (each method in a block)")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory (one extra untimed call per method and resolution)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/speed"), help="folder for speed.json/csv/png")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; every error is raised here, before any model is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error(f"argument --batch: must be even (the unconditional and prompted halves), got {args.batch}")
    if "sd" not in args.methods:
        parser.error("argument --methods: must include 'sd', the baseline every speed-up is relative to")
    if args.compile and args.warmup < 1:
        parser.error("argument --warmup: --compile needs at least 1, the first call of each method compiles")
    if args.model is None and args.arch is None:
        args.arch = "sd15"
    if args.device is None:
        args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a folder")
    args.modes = list(MODES) if args.mode == "both" else [args.mode]
    args.methods = list(dict.fromkeys(args.methods))  # drop repeats, keep order
    args.ratios = list(dict.fromkeys(args.ratios))
    return args


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compared configuration: a method at one merge ratio (the baseline has none)."""

    method: str
    ratio: float | None = None

    @property
    def name(self) -> str:
        return self.method if self.ratio is None else f"{self.method}-r{self.ratio:g}"


def variants(methods: Sequence[str], ratios: Sequence[float]) -> list[Variant]:
    """The baseline first, then every other method at every ratio."""
    others = [Variant(m, r) for r in ratios for m in methods if m != "sd"]
    return [Variant("sd"), *others]


def top_attention_downsample(down_block_types: Sequence[str]) -> int:
    """How many times coarser than the latent the highest-resolution attention level is.

    tomesd's ``max_downsample`` defaults to 1, which patches nothing on SDXL (no attention at the
    top level); passing this value makes it patch the same level as AgentSD's default.
    """
    first = next(i for i, block in enumerate(down_block_types) if "CrossAttn" in block)
    return 2**first


@contextmanager
def patched(variant: Variant, target: torch.nn.Module | Any, max_downsample: int) -> Iterator[None]:
    """Apply ``variant`` to ``target`` (a pipeline or a UNet) for the duration of the block."""
    if variant.method == "sd":
        yield
        return
    if variant.method == "tomesd":
        tomesd.apply_patch(target, ratio=variant.ratio, max_downsample=max_downsample)
        remove = tomesd.remove_patch
    else:
        agentsd.apply_patch(target, ratio=variant.ratio, **AGENTSD_KWARGS[variant.method])
        remove = agentsd.remove_patch
    try:
        yield
    finally:
        remove(target)


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A call to time: one UNet forward or one whole generation, with its inputs already built."""

    mode: str
    resolution: int
    images: int
    call: Callable[[], Any]

    @property
    def unit(self) -> tuple[str, int]:
        """How times are reported: per UNet forward (the whole guided batch) or per image."""
        return ("s/forward", 1) if self.mode == "unet" else ("s/image", self.images)


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
    # The sample goes positionally, as pipelines pass it: tomesd's pre-hook reads it from args[0].
    return Workload("unet", resolution, args.batch // 2, lambda: unet(sample, timestep, **cond))


def denoise(unet: torch.nn.Module, arch: Arch, latents: torch.Tensor, cond: dict, steps: int) -> torch.Tensor:
    """A guided text-to-image denoising loop, as the diffusers pipelines run it."""
    scheduler = arch.build_scheduler()
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, text = unet(model_input, t, **cond).sample.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE_SCALE * (text - uncond), t, latents).prev_sample
    return latents


def arch_pipeline_workload(
    unet: torch.nn.Module, arch: Arch, args: argparse.Namespace, resolution: int, vae_factor: int
) -> Workload:
    generator = torch.Generator().manual_seed(SEED)
    images, latent = args.batch // 2, resolution // vae_factor
    latents = torch.randn((images, unet.config.in_channels, latent, latent), generator=generator)
    latents = latents.to(unet.device, unet.dtype)
    cond = unet_conditioning(unet, args.batch, resolution, generator)
    return Workload("pipeline", resolution, images, lambda: denoise(unet, arch, latents, cond, args.steps))


def model_pipeline_workload(pipe: Any, args: argparse.Namespace, resolution: int) -> Workload:
    images = args.batch // 2

    def call() -> Any:
        return pipe(
            prompt=[PROMPT] * images,
            height=resolution,
            width=resolution,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE_SCALE,
            output_type="latent",
            generator=torch.Generator(pipe.device).manual_seed(SEED),
        )

    return Workload("pipeline", resolution, images, call)


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


def compiled_frames() -> int:
    """Frames torch._dynamo has compiled so far (each compile and recompile counts one)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


@dataclass
class Measurement:
    """Raw results of one variant on one workload: seconds of each timed call, peak bytes, compiles."""

    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    compiles: int | None = None


def measure(
    workload: Workload,
    target: Any,
    methods: Sequence[Variant],
    args: argparse.Namespace,
    max_downsample: int,
    progress: tqdm,
) -> dict[Variant, Measurement]:
    """Warm up, time and measure the memory of every variant on one workload.

    Eager: one block of all variants, each patched around each of its calls, so repeats
    interleave the methods. Compiled: one block per variant on a reset ``torch._dynamo``, patched
    once, so that the compile count of the timed calls is the method's own recompilations.
    """
    results = {variant: Measurement() for variant in methods}

    def run_block(block: Sequence[Variant], context: Callable[[Variant], Any]) -> None:
        def run(variant: Variant, what: str, how: Callable[[Callable[[], Any]], Any]) -> Any:
            # Shown while the call runs: a whole generation on a CPU can take many minutes.
            progress.set_postfix_str(f"{workload.mode} {workload.resolution}px {variant.name} {what}")
            with context(variant):
                value = how(workload.call)
            progress.update()
            return value

        for variant in block:
            for _ in range(args.warmup):
                run(variant, "warm-up", lambda call: call())
        frames = compiled_frames()
        for repeat in range(args.repeats):
            for variant in block:
                seconds = run(variant, f"repeat {repeat + 1}/{args.repeats}", lambda call: timed(call, args.device))
                results[variant].seconds.append(seconds)
        if args.compile:
            results[block[0]].compiles = compiled_frames() - frames
        if args.memory:
            for variant in block:
                results[variant].peak_bytes = run(variant, "memory", lambda call: peak_memory(call, args.device))

    if args.compile:
        for variant in methods:
            torch._dynamo.reset()
            with patched(variant, target, max_downsample):
                run_block([variant], lambda _: nullcontext())
    else:
        run_block(methods, lambda variant: patched(variant, target, max_downsample))
    return results


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results: a variant on one workload, with ratios to the ``sd`` baseline."""

    mode: str
    unit: str
    resolution: int
    method: str
    ratio: float | None
    median_s: float
    min_s: float
    max_s: float
    speedup: float
    peak_mib_per_image: float | None
    memory_vs_sd: float | None
    compiles: int | None
    seconds: list[float]


def rows_for(workload: Workload, results: dict[Variant, Measurement]) -> list[Row]:
    unit, per = workload.unit
    baseline = statistics.median(results[Variant("sd")].seconds) / per
    base_peak = results[Variant("sd")].peak_bytes
    rows = []
    for variant, result in results.items():
        seconds = [s / per for s in result.seconds]
        median = statistics.median(seconds)
        peak = None if result.peak_bytes is None else result.peak_bytes / workload.images / MIB
        rows.append(
            Row(
                mode=workload.mode,
                unit=unit,
                resolution=workload.resolution,
                method=variant.name,
                ratio=variant.ratio,
                median_s=median,
                min_s=min(seconds),
                max_s=max(seconds),
                speedup=baseline / median,
                peak_mib_per_image=peak,
                memory_vs_sd=None if peak is None or not base_peak else result.peak_bytes / base_peak,
                compiles=result.compiles,
                seconds=seconds,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ("mode", "px", "method", "median", "min-max", "speed-up", "peak MiB/img", "mem vs sd", "compiles")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.mode,
                str(row.resolution),
                row.method,
                f"{row.median_s:.3f} {row.unit}",
                f"{row.min_s:.3f}-{row.max_s:.3f}",
                f"{row.speedup:.2f}x",
                "n/a" if row.peak_mib_per_image is None else f"{row.peak_mib_per_image:.1f}",
                "n/a" if row.memory_vs_sd is None else f"{row.memory_vs_sd:.2f}x",
                "" if row.compiles is None else str(row.compiles),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for index, line in enumerate(lines):
        if index > 1 and line[:2] != lines[index - 1][:2]:
            text.append("")  # a blank line between workloads
        text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return "\n".join(text)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        module = sys.modules.get(package)
        return getattr(module, "__version__", None)


def machine_info(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """What a reader needs to reproduce or weigh the numbers."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "eval/speed.py", *argv]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
        "versions": {name: _version(name) for name in ("torch", "diffusers", "tomesd", "agentsd")},
        "memory_source": MEMORY_SOURCES[args.device.type],
    }


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "results": [asdict(row) for row in rows]}, indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    columns = [name for name in Row.__dataclass_fields__ if name != "seconds"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def plot_speedup(path: Path, rows: Sequence[Row], title: str) -> None:
    """Speed-up over ``sd`` against resolution, one line per method, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(row.mode for row in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for method in dict.fromkeys(row.method for row in rows if row.mode == mode and row.method != "sd"):
            points = sorted((row.resolution, row.speedup) for row in rows if row.mode == mode and row.method == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="sd (baseline)")
        ax.set_xticks(sorted({row.resolution for row in rows if row.mode == mode}))
        ax.set(
            xlabel="resolution (px)",
            ylabel="speed-up over sd",
            title=f"{mode}: " + ("one UNet forward" if mode == "unet" else "whole generation"),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_outputs(out: Path, meta: dict[str, Any], rows: Sequence[Row], title: str) -> None:
    write_json(out / "speed.json", meta, rows)
    write_csv(out / "speed.csv", rows)
    plot_speedup(out / "speedup.png", rows, title)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def load(args: argparse.Namespace) -> tuple[Any, torch.nn.Module, Arch | None, int]:
    """(patch target, UNet, architecture or None, VAE scale factor) for ``--arch`` or ``--model``."""
    dtype = DTYPES[args.dtype]
    if args.model is None:
        arch = ARCHS[args.arch]
        unet = arch.build_unet(args.device, dtype, seed=SEED)
        return unet, unet, arch, 8
    import diffusers

    # diffusers 0.40 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
    dtype_kwarg = "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, **{dtype_kwarg: dtype})
    except (OSError, ValueError) as error:
        raise SystemExit(f"speed.py: error: argument --model: cannot load {args.model!r}: {error}") from error
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.unet, None, pipe.vae_scale_factor


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    source = args.model or f"{args.arch} (random weights)"
    plan = variants(args.methods, args.ratios)
    print(
        f"speed: {'+'.join(args.modes)} mode, {source} on {args.device} {args.dtype}, batch {args.batch}, "
        f"{' '.join(map(str, args.resolutions))} px, {', '.join(v.name for v in plan)}; "
        f"{args.warmup} warm-up + {args.repeats} timed calls each -> {args.out}/speed.{{json,csv,png}}",
        flush=True,
    )
    target, unet, arch, vae_factor = load(args)
    if args.compile:
        # In place, so that patching the UNet (or the pipeline holding it) reaches the compiled code.
        unet.compile(dynamic=False)
    max_downsample = top_attention_downsample(unet.config.down_block_types)

    meta = {
        "args": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
        **machine_info(args, sys.argv[1:] if argv is None else argv),
    }
    title = f"{source}, {args.device.type} {args.dtype}, batch {args.batch}"
    args.out.mkdir(parents=True, exist_ok=True)

    calls_per_variant = args.warmup + args.repeats + int(args.memory)
    total = len(args.modes) * len(args.resolutions) * len(plan) * calls_per_variant
    rows: list[Row] = []
    with torch.inference_mode(), tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True) as progress:
        for mode in args.modes:
            for resolution in args.resolutions:
                if mode == "unet":
                    workload = unet_workload(unet, args, resolution, vae_factor)
                elif arch is not None:
                    workload = arch_pipeline_workload(unet, arch, args, resolution, vae_factor)
                else:
                    workload = model_pipeline_workload(target, args, resolution)
                rows += rows_for(workload, measure(workload, target, plan, args, max_downsample, progress))
                # After every workload: an interrupted hours-long CPU run keeps what it measured.
                write_outputs(args.out, meta, rows, title)

    print(format_table(rows))
    print(f"peak memory: {meta['memory_source']}; written {args.out}/speed.json, speed.csv, speedup.png")
    return rows


if __name__ == "__main__":
    main()
