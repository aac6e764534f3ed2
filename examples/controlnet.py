"""ControlNet (canny edges) on SD 1.5: the same seed with SD, ToMeSD and AgentSD, next to the edge map.

    python examples/controlnet.py --image room.jpg --prompt "a cozy cabin interior, warm light"

The edge map is computed with numpy (no OpenCV). Only the UNet is patched; the ControlNet runs as
usual, so its residuals still steer every step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from canny import canny
from common import add_image_arg, example_parser, image_size, load_pretrained, output_path, resolve_target, run_cli
from comparison import compare, save_comparison
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from images import input_image

MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONTROLNET = "lllyasviel/sd-controlnet-canny"
PROMPT = "a cozy cottage in the mountains at sunset, detailed, warm colors"


def build_parser() -> argparse.ArgumentParser:
    """The flags, with the input resized to the model's native size unless --width/--height say otherwise."""
    parser = example_parser(__doc__, model=MODEL, prompt=PROMPT)
    add_image_arg(parser, "picture whose canny edges guide the generation")
    parser.add_argument(
        "--controlnet", default=CONTROLNET, help=f"canny ControlNet, hub id or local folder (default: {CONTROLNET})"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Generate with each method and write edge map and results side by side; returns the PNG's path."""
    args = parse_args(argv)
    target = resolve_target(args)
    controlnet = load_pretrained(ControlNetModel, args.controlnet, target, flag="--controlnet")
    pipe = load_pretrained(StableDiffusionControlNetPipeline, args.model, target, controlnet=controlnet)
    edges = canny(input_image(args.image, *image_size(args, pipe)))
    runs = compare(
        pipe,
        args.methods,
        ratio=args.ratio,
        seed=args.seed,
        prompt=args.prompt,
        image=edges,
        num_inference_steps=args.steps,
    )
    return save_comparison(runs, output_path(args.out, "controlnet.png"), inputs=[("canny edges", edges)])


if __name__ == "__main__":
    run_cli(main)
