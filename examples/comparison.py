"""Generate the same seed with the unpatched pipeline, ToMeSD and AgentSD, and time each run.

The three runs differ only in the patch applied to the UNet: same prompt, same seed (a CPU
generator, so a seed gives the same starting noise on every device), same pipeline object. Each
patch is removed again when its run ends, even if the run fails.

The methods are those of eval/'s one registry (``eval/methods.py``), applied as ``eval/speed.py``
and ``eval/fid.py`` apply them, and timed with eval/'s one timing helper (``eval/timing.py``), which
also warns when the machine is busy.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from images import Tile, contact_sheet, save_png
from PIL import Image

# eval/'s modules, after the examples' own (appended: an example module is never shadowed).
sys.path.append(str(Path(__file__).resolve().parents[1] / "eval"))
import methods as registry  # noqa: E402
import timing  # noqa: E402

#: The registry's methods the examples compare, by their registry names; "sd" is the pipeline as loaded.
REGISTRY_NAMES = ("sd", "tomesd", "agentsd")
#: What the examples compare, by the registry's labels (``--methods SD ToMeSD AgentSD``).
METHODS = tuple(registry.METHODS[name].label for name in REGISTRY_NAMES)
_BY_LABEL = dict(zip(METHODS, REGISTRY_NAMES))


@dataclass(frozen=True)
class TimedImage:
    """One generated image and the wall-clock seconds the pipeline call took."""

    method: str
    image: Image.Image
    seconds: float

    @property
    def caption(self) -> str:
        return f"{self.method}  {self.seconds:.2f} s"


def check_methods(methods: Sequence[str]) -> None:
    """Fail before any model is loaded if a method is unknown or its package is missing
    (:class:`ModuleNotFoundError`, with the registry's reason)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    for method in methods:
        reason = registry.METHODS[_BY_LABEL[method]].unavailable()
        if reason is not None:
            raise ModuleNotFoundError(f"{method} cannot run here: {reason}")


@contextmanager
def patched(pipe: DiffusionPipeline, method: str, ratio: float, seed: int = 0) -> Iterator[None]:
    """Apply ``method``'s patch (the registry's) at merge ``ratio`` for the duration of the block.

    ToMeSD patches the top attention level (:func:`agentsd.top_attention_downsample`: one level down
    on SDXL, where tomesd's default would patch nothing); AgentSD runs its recipe, ``seed`` its
    destination choice.
    """
    if method not in _BY_LABEL:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    entry = registry.METHODS[_BY_LABEL[method]]
    with entry.applied(pipe, ratio=ratio if entry.uses_ratio else None, seed=seed):
        yield


def generate(pipe: DiffusionPipeline, method: str, *, seed: int, **call_kwargs: Any) -> TimedImage:
    """Call ``pipe`` once with a fresh generator seeded with ``seed`` and time the call.

    ``method`` only labels the result: patch the pipeline (or use :func:`patched`) beforehand.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    images: list[Image.Image] = []
    seconds = timing.timed(lambda: images.extend(pipe(**call_kwargs, generator=generator).images), pipe.device)
    return TimedImage(method=method, image=images[0], seconds=seconds)


def warm_up(pipe: DiffusionPipeline, **call_kwargs: Any) -> None:
    """Run the pipeline once, untimed, with the fewest steps it accepts (one; more at a low ``strength``).

    The first call pays one-off costs: memory allocation and kernel selection on a GPU, and on the CPU
    too (allocator, oneDNN kernel setup, lazy imports), often more than a whole step. Without this they
    land on whichever method runs first, the unpatched SD, and flatter the others. Then, as
    ``eval/speed.py`` does, a load average above the CPU count is warned before the timed calls.
    """
    steps, strength = 1, call_kwargs.get("strength")
    while strength is not None and int(steps * strength) < 1:  # image-to-image runs int(steps * strength)
        steps += 1
    pipe(**{**call_kwargs, "num_inference_steps": steps}, generator=torch.Generator("cpu").manual_seed(0))
    timing.warn_if_busy("examples", "before timing")


def compare(
    pipe: DiffusionPipeline,
    methods: Sequence[str],
    *,
    ratio: float,
    seed: int,
    warm: bool = True,
    **call_kwargs: Any,
) -> list[TimedImage]:
    """One :class:`TimedImage` per method, in order, each from the same seed and call arguments.

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


def save_comparison(runs: Sequence[TimedImage], path: Path, inputs: Sequence[Tile] = ()) -> Path:
    """Print the timings and write ``inputs`` and the runs side by side, captioned, to ``path``."""
    print(timing_table({run.method: run.seconds for run in runs}))
    save_png(contact_sheet([[*inputs, *((run.caption, run.image) for run in runs)]]), path)
    print(f"wrote {path}")
    return path
