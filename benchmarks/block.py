"""One merged transformer block alone, eager and compiled, for each method: how close to the ceiling.

    python benchmarks/block.py --resolution 768 --repeats 5
    python benchmarks/block.py --resolution 2048 --modes eager --methods sd agent-phase ceiling \
        --agentsd sx=2,sy=2,agent_ratio=0.95 agent_ratio=0.9,sx=4,sy=4   # a knob study
    python benchmarks/block.py --device cuda --dtype float16 --resolution 512 --repeats 20 \
        --compiler-mode reduce-overhead --methods sd todo agent-phase ceiling --profile 12   # where a GPU's time goes

    python benchmarks/block.py --arch flux --block single_transformer_blocks.0 --resolution 1024 \
        --modes eager --repeats 3 --methods sd todo agent-phase tome-phase ceiling   # one full-width Flux block

A whole-UNet forward mixes the blocks that merging speeds up with convolutions and unmerged levels,
so its ratios move with everything else. This times the one block that the ratio is about: the
first transformer block of the SD 1.5 UNet's top level (dim 320; 4,096 / 9,216 / 16,384 / 65,536
tokens at 512 / 768 / 1024 / 2048 px) by default, eager and compiled
(``torch.compile(block, fullgraph=True, dynamic=False)``, without ``fullgraph`` where it fails:
tomesd), the methods in turn, order reversed every round. ``--arch`` also takes the diffusion
transformers of ``eval/transformer_configs.py`` (``sd35-medium``, ``pixart-sigma``, ``flux``: full width,
one double- and one single-stream block), whose every block sees every image token: the default is
the first block, ``--block`` picks another (``single_transformer_blocks.0`` for Flux's single stream),
the inputs are eval/speed.py's for that model (SD3 and PixArt a guided pair, Flux one row). "of the
way" is how far the block gets from the plain one towards the ceiling (its self-attention for free):
(plain - method) / (plain - ceiling), per mode.

Each method has its own twin of the UNet (``measure.twin``: same weights), applied as
``eval/methods.py`` applies it; ``--agentsd KNOBS`` adds AgentSD with one fixed phase of those
knobs (``sx``, ``sy``, ``agent_ratio``, ``ratio``, ``max_downsample``, ...: ``agentsd.AgentSDConfig``).
The block's input is captured once, from the plain model's forward at t = 981 (eval/speed.py's
inputs), which stops at the block; each method's forward is then started and stopped at its
first layer, which sets its patch's per-call state (phase, grid layouts, latent size). So no whole
forward runs (a 2048 px SD 1.5 forward is about 11 min on 2 CPU cores): for the top level's first
block the input is every method's own; for a later block (``--block``) it is the plain UNet's,
which costs the same (a block's time depends on shapes, not values).

On a GPU (``--device cuda``, ``--dtype float16``) the compiled block can run under CUDA graphs
(``--compiler-mode reduce-overhead``), where kernel launches cost nothing and what is left is each
kernel's own time; ``--profile N`` prints, for every variant and mode, the N kernels (device time on a
GPU, CPU time on the CPU) of one more call that took longest, and how many kernels it ran: where the
time of a merged block goes, against the plain block's attention.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
import measure  # noqa: E402
import methods as registry  # noqa: E402
import timing  # noqa: E402
import workloads  # noqa: E402
from transformer_configs import TRANSFORMER_ARCHS  # noqa: E402
from unet_configs import ARCHS  # noqa: E402

import agentsd  # noqa: E402


class _Stop(Exception):
    """Ends a UNet forward early, at the module whose input was wanted."""


def run_until(module: torch.nn.Module, forward: Callable[[], Any]) -> tuple[tuple, dict]:
    """The arguments ``module`` gets during ``forward()``, a forward of the UNet that holds it,
    which stops there (the UNet-level hooks of the patches have run by then)."""
    seen: dict[str, Any] = {}

    def stop(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(args=args, kwargs=kwargs)
        raise _Stop

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        forward()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The first layer ``model``'s forward runs, after its patches' per-call hooks: a UNet's ``conv_in``,
    Flux's ``x_embedder``, SD3's and PixArt's ``pos_embed``."""
    return next(getattr(model, name) for name in ("conv_in", "x_embedder", "pos_embed") if hasattr(model, name))


def agentsd_knobs(text: str) -> dict[str, Any]:
    """``sx=2,sy=2,agent_ratio=0.95`` -> AgentSD keywords of one fixed phase at ratio 0.4 (unless given), checked."""
    knobs: dict[str, Any] = {"schedule": "fixed", "ratio": 0.4}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            knobs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected key=number pairs, got {item!r}") from None
    try:
        agentsd.AgentSDConfig(**knobs)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return knobs


def knobs_label(knobs: dict[str, Any]) -> str:
    """``agentsd[ratio=0.4,sx=2]``: a variant's name from its :func:`agentsd_knobs` (the fixed schedule implied)."""
    return "agentsd[" + ",".join(f"{key}={value}" for key, value in knobs.items() if key != "schedule") + "]"


@contextmanager
def knobbed(unet: Any, knobs: dict[str, Any] | None) -> Iterator[None]:
    """``unet`` patched with AgentSD's :func:`agentsd_knobs` for the block; ``None``: left unpatched."""
    if knobs is None:
        yield
        return
    agentsd.apply_patch(unet, **knobs)
    try:
        yield
    finally:
        agentsd.remove_patch(unet)


def print_profile(label: str, call: Callable[[], Any], device: torch.device, rows: int) -> None:
    """The ``rows`` kernels of one ``call`` that took longest: device time on a GPU; on the CPU, the ATen
    operations' own CPU time (their kernels are not profiled apart)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    timing.synchronize(device)
    with torch.profiler.profile(activities=activities) as profile:
        call()
        timing.synchronize(device)
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    events = [
        event
        for event in profile.key_averages()
        if getattr(event, key) > 0 and (event.device_type == torch.autograd.DeviceType.CUDA) == on_device
    ]
    events.sort(key=lambda event: getattr(event, key), reverse=True)
    total = sum(getattr(event, key) for event in events)
    what = "kernels" if on_device else "ATen operations"
    print(f"\n{label}: {sum(event.count for event in events)} {what}, {total / 1e3:.3f} ms in all")
    for event in events[:rows]:
        print(f"  {getattr(event, key) / 1e3:8.3f} ms  {event.count:4d}x  {event.key[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted({**ARCHS, **TRANSFORMER_ARCHS}), default="sd15")
    parser.add_argument(
        "--block",
        default=None,
        help="the block's path in the model (default: the first one AgentSD patches by default, the top "
        "attention level's first: down_blocks.0... on SD 1.x/2.x, down_blocks.1... on SDXL; a diffusion "
        "transformer's first block, transformer_blocks.0)",
    )
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["sd", "tomesd", "agent-phase", "tome-phase", "ceiling"])
    parser.add_argument(
        "--agentsd",
        type=agentsd_knobs,
        nargs="+",
        default=[],
        metavar="KNOBS",
        help="more variants: AgentSD with one fixed phase of these knobs (key=value,...; ratio 0.4 unless given)",
    )
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument(
        "--compiler-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        default=None,
        help="torch.compile's mode for the compiled block (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print each call's N longest kernels")
    args = parser.parse_args()
    if args.methods[0] != "sd" or "ceiling" not in args.methods:
        parser.error("argument --methods: must start with sd and include ceiling (the two ends of the scale)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available on this machine (choose cpu)")
    if args.profile < 0:
        parser.error(f"argument --profile: expected a kernel count of 0 or more, got {args.profile}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    dtype = getattr(torch, args.dtype)
    transformer = TRANSFORMER_ARCHS.get(args.arch)
    if transformer is None:
        unet = ARCHS[args.arch].build_unet(device=device, dtype=dtype).eval()
        # eval/speed.py's UNet forward: seeded latents and text embeddings, batch 2, t = 981.
        workload = workloads.unet_workload(unet, args.resolution, vae_factor=8, batch=2, timestep=981)
    else:
        unet = transformer.build(device, dtype)
        # eval/speed.py's forward of this model: its pipeline's inputs for one image, t = 981.
        workload = workloads.transformer_workload(unet, transformer, args.resolution, batch=2, timestep=981)
    args.block = args.block or agentsd.select_blocks(unet)[0].name  # the first of AgentSD's default blocks
    names = [name for name, _ in unet.named_modules()]
    if args.block not in names:
        blocks = [name for name in names if name.endswith(tuple(f"blocks.{i}" for i in range(10)))]
        parser.error(f"argument --block: {args.block!r} is not a module of {args.arch}; e.g. {', '.join(blocks[:6])}")

    def registered(name: str) -> Callable[[Any], Any]:
        method = registry.METHODS[name]
        ratio = 0.4 if method.uses_ratio else None
        return lambda twin: method.applied(twin, ratio=ratio, options=registry.MethodOptions())

    variants = {name: registered(name) for name in args.methods}
    for knobs in args.agentsd:
        variants[knobs_label(knobs)] = functools.partial(knobbed, knobs=knobs)

    calls = {}
    block_args: tuple = ()
    block_kwargs: dict = {}
    with ExitStack() as applied, torch.inference_mode():
        for index, (name, apply) in enumerate(variants.items()):
            twin = measure.twin(unet)
            try:
                applied.enter_context(apply(twin))
            except (TypeError, ValueError) as error:  # a method that refuses this model, before any timing
                parser.error(f"argument --methods: {name} on {args.arch}: {error}")
            block = twin.get_submodule(args.block)
            if index == 0:  # sd: the block's input, from the plain UNet
                block_args, block_kwargs = run_until(block, lambda twin=twin: workload.call(twin, False))
            else:  # the patch's per-call state, from its own UNet's call
                run_until(first_layer(twin), lambda twin=twin: workload.call(twin, False))
            calls[name] = {}
            if "eager" in args.modes:
                calls[name]["eager"] = functools.partial(block, *block_args, **block_kwargs)
            if "compiled" in args.modes:
                for fullgraph in (True, False):
                    options = measure.compile_options("inductor", fullgraph, args.compiler_mode)
                    compiled = torch.compile(block, **options)
                    try:
                        compiled(*block_args, **block_kwargs)
                        break
                    except torch._dynamo.exc.Unsupported:
                        print(f"{name}: fullgraph=True fails; compiled with graph breaks", flush=True)
                calls[name]["compiled"] = functools.partial(compiled, *block_args, **block_kwargs)
            tokens = block_args[0].shape[1] if block_args else block_kwargs["hidden_states"].shape[1]
            print(f"{name}: ready ({tokens} tokens)", flush=True)
        for call in (call for modes in calls.values() for call in modes.values()):
            call()  # warm-up (eager: first-call allocations; compiled: already compiled above)
        times = {(name, mode): [] for name in variants for mode in args.modes}
        for repeat in range(args.repeats):
            for name in variants if repeat % 2 == 0 else reversed(list(variants)):
                for mode, call in calls[name].items():
                    times[name, mode].append(timing.timed(call, device))
        if args.profile:
            for name, modes in calls.items():
                for mode, call in modes.items():
                    print_profile(f"{name}, {mode}", call, device, args.profile)

    median = {key: statistics.median(ts) for key, ts in times.items()}
    setting = f"{args.device} {args.dtype}" + (
        f", compiled with mode {args.compiler_mode}" if args.compiler_mode else ""
    )
    batch = 2 if transformer is None or transformer.guided else 1
    where = f"{args.arch} `{args.block}` at {args.resolution} px, batch {batch}, {setting}"
    print(f"\n{where}, ms per call, median of {args.repeats}:")
    print("| method | " + " | ".join(f"{mode} | of the way" for mode in args.modes) + " |")
    print("|---|" + "---|---|" * len(args.modes))
    for name in variants:
        cells = []
        for mode in args.modes:
            plain, ceiling, own = median["sd", mode], median["ceiling", mode], median[name, mode]
            spread = f"{min(times[name, mode]) * 1e3:.0f}-{max(times[name, mode]) * 1e3:.0f}"
            # No ceiling below plain: the block is not one that the ceiling (AgentSD's default blocks) skips.
            way = f"{(plain - own) / (plain - ceiling):.0%}" if plain > ceiling else "n/a"
            cells += [f"{own * 1e3:.0f} ({spread})", way]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
