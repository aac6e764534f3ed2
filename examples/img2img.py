"""Image-to-image with SD 1.5: the same seed with SD, ToMeSD and AgentSD, next to the input image.

    python examples/img2img.py --image photo.jpg --prompt "a watercolor painting" --strength 0.6

Without --image a drawn sample scene is used. Image-to-image starts part-way down the noise
schedule (--strength), so fewer steps run in AgentSD's agent phase than in text-to-image.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common import (
    add_image_arg,
    add_strength_arg,
    example_parser,
    image_size,
    load_pretrained,
    output_path,
    parse_with_strength,
    resolve_target,
    run_cli,
)
from comparison import compare, save_comparison
from diffusers import StableDiffusionImg2ImgPipeline
from images import input_image

MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROMPT = "a watercolor painting of a house in the hills, soft light"


def build_parser() -> argparse.ArgumentParser:
    """The flags, with the input resized to the model's native size unless --width/--height say otherwise."""
    parser = example_parser(__doc__, model=MODEL, prompt=PROMPT)
    add_image_arg(parser, "input image")
    add_strength_arg(parser, default=0.75)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_with_strength(build_parser(), argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Generate with each method and write input and results side by side; returns the PNG's path."""
    args = parse_args(argv)
    target = resolve_target(args)
    pipe = load_pretrained(StableDiffusionImg2ImgPipeline, args.model, target)
    image = input_image(args.image, *image_size(args, pipe))
    runs = compare(
        pipe,
        args.methods,
        ratio=args.ratio,
        seed=args.seed,
        prompt=args.prompt,
        image=image,
        strength=args.strength,
        num_inference_steps=args.steps,
    )
    return save_comparison(runs, output_path(args.out, "img2img.png"), inputs=[("input", image)])


if __name__ == "__main__":
    run_cli(main)
