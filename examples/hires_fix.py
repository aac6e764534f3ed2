"""Hires fix with SD 1.5: generate at 512 px, upscale 2x, refine with image-to-image at 1024 px.

    python examples/hires_fix.py --prompt "a castle on a cliff at dusk" --steps 30 --strength 0.5
    python examples/hires_fix.py --upscale image      # upscale the decoded picture instead of the latent

The common way to get a large picture out of a model trained at 512 px: a first pass at the native
size sets the layout, then the upscaled result is noised part-way (--strength, usually 0.4-0.6)
and denoised again at the large size, where a model asked for 1024 px directly would repeat
subjects. Both passes run with the same method (SD, ToMeSD or AgentSD) and seed; the time shown is
both passes together. --upscale latent (the default) interpolates the first pass's latent
(bilinear), no VAE round trip; --upscale image decodes it, resizes the picture (Lanczos) and
encodes it again.

AgentSD's recipe picks its phase by noise level, not by step: its agent phase covers t >= 0.6 T.
A second pass at --strength 0.6 or less starts below that, so it runs AgentSD's ToMe phase only;
the first pass runs both phases. The second pass, at 4x the tokens, is where merging saves most.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from common import (
    add_strength_arg,
    example_parser,
    image_size,
    load_pretrained,
    output_path,
    parse_with_strength,
    resolve_target,
    run_cli,
)
from comparison import TimedImage, generate, patched, save_comparison, warm_up
from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline
from PIL import Image

from agentsd.config import RECIPE_SWITCH

MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROMPT = "a castle on a cliff above the sea at dusk, highly detailed"
SCALE = 2
UPSCALES = ("latent", "image")


def build_parser() -> argparse.ArgumentParser:
    """The examples' flags (--height/--width: the first pass's size) plus the second pass's."""
    parser = example_parser(__doc__, model=MODEL, prompt=PROMPT)
    add_strength_arg(parser, default=0.5)
    parser.add_argument(
        "--upscale",
        choices=UPSCALES,
        default="latent",
        help="what is upscaled 2x between the passes: the latent, or the decoded picture (default: latent)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_with_strength(build_parser(), argv)


def upscaled(first: torch.Tensor | Image.Image) -> torch.Tensor | Image.Image:
    """The first pass's output, ``SCALE`` times larger: a [C, h, w] latent (bilinear) or a picture (Lanczos)."""
    if isinstance(first, Image.Image):
        return first.resize((first.width * SCALE, first.height * SCALE), Image.Resampling.LANCZOS)
    return torch.nn.functional.interpolate(first.unsqueeze(0), scale_factor=SCALE, mode="bilinear")


def hires_fix(
    pipe: StableDiffusionPipeline,
    img2img: StableDiffusionPipeline,
    method: str,
    *,
    seed: int,
    upscale: str,
    strength: float,
    width: int,
    height: int,
    **call_kwargs: object,
) -> TimedImage:
    """Both passes with the method already applied to the shared UNet; the run's time is their sum.

    Image-to-image pipelines take a 4-channel ``image`` as a latent as it is, so the latent path
    skips the VAE between the passes.
    """
    output_type = "latent" if upscale == "latent" else "pil"
    first = generate(pipe, method, seed=seed, width=width, height=height, output_type=output_type, **call_kwargs)
    second = generate(img2img, method, seed=seed, image=upscaled(first.image), strength=strength, **call_kwargs)
    return TimedImage(method=method, image=second.image, seconds=first.seconds + second.seconds)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the hires fix with each method and write the results side by side; returns the PNG's path."""
    args = parse_args(argv)
    target = resolve_target(args)
    pipe = load_pretrained(StableDiffusionPipeline, args.model, target)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # the same modules: patching one patches both
    width, height = image_size(args, pipe)
    call = {"prompt": args.prompt, "num_inference_steps": args.steps}
    if "AgentSD" in args.methods and args.strength <= RECIPE_SWITCH:
        print(
            f"note: at --strength {args.strength} the second pass starts below t = {RECIPE_SWITCH} T: AgentSD runs "
            "its ToMe phase there (its agent phase only in the first pass)"
        )
    warm_up(pipe, width=width, height=height, **call)
    runs = []
    for method in args.methods:
        with patched(pipe, method, args.ratio):
            runs.append(
                hires_fix(
                    pipe,
                    img2img,
                    method,
                    seed=args.seed,
                    upscale=args.upscale,
                    strength=args.strength,
                    width=width,
                    height=height,
                    **call,
                )
            )
    return save_comparison(runs, output_path(args.out, "hires_fix.png"))


if __name__ == "__main__":
    run_cli(main)
