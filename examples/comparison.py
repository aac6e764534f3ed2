"""Generate the same seed with the unpatched pipeline, ToMeSD and AgentSD, and time each run.

The three runs differ only in the patch applied to the UNet: same prompt, same seed (a CPU
generator, so a seed gives the same starting noise on every device), same pipeline object. Each
patch is removed again when its run ends, even if the run fails.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from diffusers import DiffusionPipeline
from images import Tile, contact_sheet, save_png
from PIL import Image

import agentsd

#: What the examples compare; "SD" is the pipeline as loaded.
METHODS = ("SD", "ToMeSD", "AgentSD")


@dataclass(frozen=True)
class Run:
    """One generated image and the wall-clock seconds the pipeline call took."""

    method: str
    image: Image.Image
    seconds: float

    @property
    def caption(self) -> str:
        return f"{self.method}  {self.seconds:.2f} s"


def check_methods(methods: Sequence[str]) -> None:
    """Fail before any model is loaded if a method is unknown or its package is missing."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "ToMeSD" in methods:
        importlib.import_module("tomesd")


def top_attention_downsample(unet: torch.nn.Module) -> int:
    """How much coarser than the latent the UNet's highest-resolution attention runs.

    ToMeSD only patches blocks up to its ``max_downsample`` (default 1). SD 1.x/2.x attend at full
    latent resolution (1), SDXL only from the second level down (2), where tomesd's default would
    patch nothing at all.
    """
    for level, block_type in enumerate(unet.config.down_block_types):
        if "CrossAttn" in block_type:
            return 2**level
    raise ValueError(f"{type(unet).__name__} has no cross-attention down block")


@contextmanager
def patched(pipe: DiffusionPipeline, method: str, ratio: float) -> Iterator[None]:
    """Apply ``method``'s patch at merge ``ratio`` for the duration of the block."""
    if method == "SD":
        yield
        return
    if method == "ToMeSD":
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio, max_downsample=top_attention_downsample(pipe.unet))
        remove = tomesd.remove_patch
    elif method == "AgentSD":
        agentsd.apply_patch(pipe, ratio=ratio)
        remove = agentsd.remove_patch
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        yield
    finally:
        remove(pipe)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def generate(pipe: DiffusionPipeline, method: str, *, seed: int, **call_kwargs: Any) -> Run:
    """Call ``pipe`` once with a fresh generator seeded with ``seed`` and time the call.

    ``method`` only labels the result: patch the pipeline (or use :func:`patched`) beforehand.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    _synchronize(pipe.device)
    start = perf_counter()
    image = pipe(**call_kwargs, generator=generator).images[0]
    _synchronize(pipe.device)
    return Run(method=method, image=image, seconds=perf_counter() - start)


def warm_up(pipe: DiffusionPipeline, **call_kwargs: Any) -> None:
    """Run the pipeline once, untimed, with the fewest steps it accepts (one; more at a low ``strength``).

    The first call pays one-off costs: memory allocation and kernel selection on a GPU, and on the CPU
    too (allocator, oneDNN kernel setup, lazy imports), often more than a whole step. Without this they
    land on whichever method runs first, the unpatched SD, and flatter the others.
    """
    steps, strength = 1, call_kwargs.get("strength")
    while strength is not None and int(steps * strength) < 1:  # image-to-image runs int(steps * strength)
        steps += 1
    pipe(**{**call_kwargs, "num_inference_steps": steps}, generator=torch.Generator("cpu").manual_seed(0))


def compare(
    pipe: DiffusionPipeline,
    methods: Sequence[str],
    *,
    ratio: float,
    seed: int,
    warm: bool = True,
    **call_kwargs: Any,
) -> list[Run]:
    """One :class:`Run` per method, in order, each from the same seed and call arguments.

    ``warm=False`` skips :func:`warm_up`, for a pipeline that has already generated.
    """
    check_methods(methods)
    if warm:
        warm_up(pipe, **call_kwargs)
    runs = []
    for method in methods:
        with patched(pipe, method, ratio):
            runs.append(generate(pipe, method, seed=seed, **call_kwargs))
    return runs


def timing_table(seconds: Mapping[str, float]) -> str:
    """Seconds per method, and the speed-up over the unpatched "SD" run when there is one."""
    baseline = seconds.get("SD")
    lines = []
    for method, spent in seconds.items():
        line = f"{method:<8} {spent:8.2f} s"
        if baseline is not None and method != "SD":
            line += f"   {baseline / spent:.2f}x vs SD"
        lines.append(line)
    return "\n".join(lines)


def save_comparison(runs: Sequence[Run], path: Path, inputs: Sequence[Tile] = ()) -> Path:
    """Print the timings and write ``inputs`` and the runs side by side, captioned, to ``path``."""
    print(timing_table({run.method: run.seconds for run in runs}))
    save_png(contact_sheet([[*inputs, *((run.caption, run.image) for run in runs)]]), path)
    print(f"wrote {path}")
    return path
