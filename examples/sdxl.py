"""SDXL text-to-image: the same seed with SDXL, ToMeSD and AgentSD, side by side with their times.

    python examples/sdxl.py --prompt "a corgi astronaut, studio light" --steps 30 --out outputs/

SDXL has no attention at full latent resolution, so both patches act one level down (AgentSD finds
this itself; ToMeSD is given max_downsample=2). At 1024 px, merging saves more than at 512 px.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common import example_parser, load_pretrained, output_path, resolve_target, run_cli
from comparison import compare, save_comparison
from diffusers import StableDiffusionXLPipeline

MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPT = "a photo of an astronaut riding a horse on the moon, high detail"


def build_parser() -> argparse.ArgumentParser:
    return example_parser(__doc__, model=MODEL, prompt=PROMPT)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Generate with each method and write the side-by-side PNG; returns its path."""
    args = parse_args(argv)
    target = resolve_target(args)
    pipe = load_pretrained(StableDiffusionXLPipeline, args.model, target)
    runs = compare(
        pipe,
        args.methods,
        ratio=args.ratio,
        seed=args.seed,
        prompt=args.prompt,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
    )
    return save_comparison(runs, output_path(args.out, "sdxl.png"))


if __name__ == "__main__":
    run_cli(main)
