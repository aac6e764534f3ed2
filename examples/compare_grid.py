"""A comparison grid for a list of prompts: one row per prompt, one column per method, with times.

    python examples/compare_grid.py --prompts "a corgi on a beach" "a bowl of ramen" --out grid.png
    python examples/compare_grid.py --prompt-file prompts.txt --model stabilityai/stable-diffusion-xl-base-1.0

--model may be any text-to-image Stable Diffusion checkpoint (1.x, 2.x or XL): the pipeline
class is picked from the model's own model_index.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common import example_parser, load_pretrained, output_path, resolve_target, run_cli
from comparison import TimedImage, compare, timing_table
from diffusers import AutoPipelineForText2Image
from images import contact_sheet, save_png

MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROMPTS = (
    "a photo of a corgi running on a beach at sunset",
    "a bowl of ramen with a soft-boiled egg, top view",
    "an oil painting of a lighthouse in a storm",
    "a futuristic city street at night, neon signs, rain",
)


def _prompt_file(text: str) -> list[str]:
    try:
        lines = Path(text).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {err.strerror or err}") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise argparse.ArgumentTypeError(f"{text} has no prompts (one per line expected)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = example_parser(__doc__, model=MODEL, prompt=None)
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompts",
        nargs="+",
        default=list(PROMPTS),
        help="one or more prompts, one per row (default: 4 sample prompts: corgi, ramen, lighthouse, city)",
    )
    prompts.add_argument(
        "--prompt-file", type=_prompt_file, help="text file with one prompt per line, instead of --prompts"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.prompt_file is not None:
        args.prompts = args.prompt_file
    return args


def mean_seconds(rows: Sequence[Sequence[TimedImage]]) -> dict[str, float]:
    """Average seconds per image of each method over all prompts."""
    return {column[0].method: sum(run.seconds for run in column) / len(column) for column in zip(*rows, strict=True)}


def main(argv: Sequence[str] | None = None) -> Path:
    """Generate every prompt with every method and write the grid; returns the PNG's path."""
    args = parse_args(argv)
    target = resolve_target(args)
    pipe = load_pretrained(AutoPipelineForText2Image, args.model, target)
    call = {"num_inference_steps": args.steps, "height": args.height, "width": args.width}
    rows = [
        compare(pipe, args.methods, ratio=args.ratio, seed=args.seed, warm=row == 0, prompt=prompt, **call)
        for row, prompt in enumerate(args.prompts)
    ]
    print(f"mean over {len(rows)} prompts:\n{timing_table(mean_seconds(rows))}")
    tiles = [[(run.caption, run.image) for run in row] for row in rows]
    path = save_png(contact_sheet(tiles, titles=args.prompts), output_path(args.out, "grid.png"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
