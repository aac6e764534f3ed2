"""One merged transformer block alone, eager and compiled, for each method: how close to the ceiling.

    python benchmarks/block.py --resolution 768 --repeats 5

A whole-UNet forward mixes the blocks that merging speeds up with convolutions and unmerged levels,
so its ratios move with everything else. This times the one block that the ratio is about: the
first transformer block of the SD 1.5 UNet's top level (dim 320; 4,096 / 9,216 / 16,384 tokens at
512 / 768 / 1024 px), on its real input, captured from a UNet forward at t = 981 with the method
applied as ``eval/methods.py`` applies it. Each method has its own twin of the UNet
(``speed.twin``: same weights), and its block is timed eager and compiled
(``torch.compile(block, fullgraph=True, dynamic=False)``, without ``fullgraph`` where it fails:
tomesd), the methods in turn, order reversed every round. "of the way" is how far the block gets
from the plain one towards the ceiling (its self-attention for free): (plain - method) / (plain -
ceiling), per mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
import methods as registry  # noqa: E402
import speed  # noqa: E402
from unet_configs import ARCHS  # noqa: E402


def capture_block_call(block: torch.nn.Module, forward: Callable[[], Any]) -> tuple[tuple, dict]:
    """The arguments ``block`` gets during ``forward()``, a forward of the UNet that holds it.

    The forward also leaves the patches' per-call state (phase, grid layouts, tomesd's latent size) set.
    """
    seen: dict[str, Any] = {}
    handle = block.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    try:
        forward()
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument(
        "--block", default="down_blocks.0.attentions.0.transformer_blocks.0", help="the block's path in the UNet"
    )
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["sd", "tomesd", "agent-phase", "tome-phase", "ceiling"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.methods[0] != "sd" or "ceiling" not in args.methods:
        parser.error("argument --methods: must start with sd and include ceiling (the two ends of the scale)")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    unet = ARCHS[args.arch].build_unet().eval()
    # eval/speed.py's UNet forward: seeded latents and text embeddings, batch 2, t = 981.
    workload = speed.unet_workload(unet, argparse.Namespace(batch=2, timestep=981), args.resolution, vae_factor=8)

    calls = {}
    with ExitStack() as applied, torch.inference_mode():
        for name in args.methods:
            method = registry.METHODS[name]
            twin = speed.twin(unet)
            applied.enter_context(
                method.applied(twin, ratio=0.4 if method.uses_ratio else None, options=registry.MethodOptions())
            )
            block = twin.get_submodule(args.block)
            block_args, block_kwargs = capture_block_call(block, lambda twin=twin: workload.call(twin, False))
            for fullgraph in (True, False):
                compiled = torch.compile(block, fullgraph=fullgraph, dynamic=False)
                try:
                    compiled(*block_args, **block_kwargs)
                    break
                except torch._dynamo.exc.Unsupported:
                    print(f"{name}: fullgraph=True fails; compiled with graph breaks", flush=True)
            calls[name] = {
                "eager": lambda block=block, a=block_args, k=block_kwargs: block(*a, **k),
                "compiled": lambda compiled=compiled, a=block_args, k=block_kwargs: compiled(*a, **k),
            }
            tokens = block_args[0].shape[1] if block_args else block_kwargs["hidden_states"].shape[1]
            print(f"{name}: ready ({tokens} tokens)", flush=True)
        times = {(name, mode): [] for name in args.methods for mode in ("eager", "compiled")}
        for repeat in range(args.repeats):
            for name in args.methods if repeat % 2 == 0 else reversed(args.methods):
                for mode, call in calls[name].items():
                    times[name, mode].append(speed.timed(call, torch.device("cpu")))

    median = {key: statistics.median(ts) for key, ts in times.items()}
    print(f"\n{args.arch} `{args.block}` at {args.resolution} px, batch 2, ms per call, median of {args.repeats}:")
    print("| method | eager | of the way | compiled | of the way |\n|---|---|---|---|---|")
    for name in args.methods:
        cells = []
        for mode in ("eager", "compiled"):
            plain, ceiling, own = median["sd", mode], median["ceiling", mode], median[name, mode]
            spread = f"{min(times[name, mode]) * 1e3:.0f}-{max(times[name, mode]) * 1e3:.0f}"
            cells += [f"{own * 1e3:.0f} ({spread})", f"{(plain - own) / (plain - ceiling):.0%}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
