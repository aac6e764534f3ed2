"""The denoising models AgentSD patches in diffusers, and what it must know of each.

A pipeline's backbone is a UNet (SD 1.x, 2.x, SDXL and what diffusers builds on them) or one of the
diffusion transformers of Stable Diffusion 3 / 3.5, Flux and PixArt-α/Σ. A :class:`Backbone` says
how to read a call of the model: where its timestep is and in what unit, and the token grid of the
call at the finest level. Where the blocks are is ``agentsd.diffusers_patch.blocks``' business.

Every other model is refused by name, with what is supported: Sana's attention is linear already;
video, audio and the other image transformers have their own token layouts and blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: The diffusion transformers AgentSD patches, by class name (diffusers' ``models.transformers``).
TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel")
UNET_PARTS = ("down_blocks", "up_blocks", "conv_in")
SUPPORTED = (
    "UNets of Stable Diffusion 1.x, 2.x and SDXL pipelines, and the transformers of SD3 / SD3.5 "
    f"({TRANSFORMERS[0]}), Flux ({TRANSFORMERS[1]}) and PixArt-α/Σ ({TRANSFORMERS[2]})"
)
#: Why a transformer that is not supported is left alone, where there is more to say than "not supported".
WHY_NOT = {"SanaTransformer2DModel": "its attention is linear already, so there is no quadratic cost to cut"}


@dataclass(frozen=True)
class Backbone:
    """How a family of denoising models is called.

    Attributes:
        family: ``"UNet"``, ``"SD3"``, ``"Flux"`` or ``"PixArt"``.
        timestep_position: Where ``timestep`` sits among the forward's positional arguments.
        timestep_scale: What the model's timestep is multiplied by to give the scheduler's (Flux's
            pipelines pass ``t / 1000``; the others the scheduler's own timesteps).
        guidance_batch: Whether a call's batch holds the prompted and unprompted halves of
            classifier-free guidance (Flux is guidance-distilled: one sample per image).
        text_first: Whether a joint attention's sequence is ``[text ; image]`` (Flux) or not.
    """

    family: str
    timestep_position: int
    timestep_scale: float = 1.0
    guidance_batch: bool = True
    text_first: bool = False

    def timestep(self, args: tuple, kwargs: dict) -> Any:
        """The call's timestep argument."""
        return args[self.timestep_position] if len(args) > self.timestep_position else kwargs["timestep"]

    def sample(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The call's latent or tokens (``sample`` of a UNet, ``hidden_states`` of a transformer)."""
        return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))

    def latent_size(self, args: tuple, kwargs: dict, ids_grid: IdsGrid) -> tuple[int, int]:
        """(h, w) of the call's finest token grid, before the blocks' own downsampling.

        A UNet's and a patchified transformer's is the latent's (the blocks' ``downsample`` is the
        patch size); Flux's packed tokens say nothing of it, so it is read from ``img_ids``.
        """
        sample = self.sample(args, kwargs)
        if self.family != "Flux":
            return sample.shape[-2], sample.shape[-1]
        ids = args[4] if len(args) > 4 else kwargs["img_ids"]
        return ids_grid.read(ids, sample.shape[1])


BACKBONES = {
    "UNet": Backbone("UNet", timestep_position=1),
    "SD3Transformer2DModel": Backbone("SD3", timestep_position=3),
    "FluxTransformer2DModel": Backbone(
        "Flux", timestep_position=3, timestep_scale=1000.0, guidance_batch=False, text_first=True
    ),
    "PixArtTransformer2DModel": Backbone("PixArt", timestep_position=2),
}


def is_unet(module: Any) -> bool:
    """Whether ``module`` is a diffusers UNet (``UNet2DConditionModel``, ``UNetMotionModel``, ...)."""
    return isinstance(module, torch.nn.Module) and all(hasattr(module, name) for name in UNET_PARTS)


def transformer_class(module: Any) -> str | None:
    """The name of the supported transformer class ``module`` is an instance of, or ``None``."""
    if not isinstance(module, torch.nn.Module):
        return None
    names = {cls.__name__ for cls in type(module).__mro__ if cls.__module__.startswith("diffusers.")}
    return next((name for name in TRANSFORMERS if name in names), None)


def backbone_of(module: Any) -> Backbone | None:
    """The :class:`Backbone` of a denoising model, or ``None`` if AgentSD does not patch it."""
    if is_unet(module):
        return BACKBONES["UNet"]
    name = transformer_class(module)
    return BACKBONES[name] if name is not None else None


def find_backbone(model: Any) -> torch.nn.Module:
    """The denoising model of a pipeline (its ``.unet`` or ``.transformer``), or ``model`` itself if it is one.

    Raises:
        TypeError: ``model`` holds no model AgentSD patches; the message names what it has and what
            is supported.
    """
    for candidate in (getattr(model, "unet", None), getattr(model, "transformer", None), model):
        if backbone_of(candidate) is not None:
            return candidate
    found = getattr(model, "transformer", None) or getattr(model, "unet", None)
    if found is None and "Transformer" not in type(model).__name__:
        raise TypeError(
            "model must be a diffusers pipeline with a `.unet` or a UNet2DConditionModel, or one with a "
            f"`.transformer` (SD3, Flux, PixArt) or that transformer; got {type(model).__name__}"
        )
    found = found if found is not None else model
    name = type(found).__name__
    why = f": {WHY_NOT[name]}" if name in WHY_NOT else ""
    holds = f"{type(model).__name__}'s {name}" if found is not model else name
    raise TypeError(f"{holds} is not a model AgentSD patches{why}. Supported: {SUPPORTED}")


@dataclass
class IdsGrid:
    """Flux's token grid, read from ``img_ids`` (rows ``(0, row, col)``) on the host once per tensor.

    A pipeline builds ``img_ids`` once per generation, so the read (a device sync) happens once, not
    at every step. Traced calls cannot read: they use the last grid read for the same token count,
    else a square grid.

    Attributes:
        key: What identifies the tensor last read (storage pointer, version, shape).
        grid: The grid read from it.
    """

    key: tuple | None = None
    grid: tuple[int, int] | None = None

    def read(self, ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
        if ids.ndim == 3:  # the batched layout older pipelines passed
            ids = ids[0]
        if torch.compiler.is_compiling():
            return self._traced(num_tokens)
        key = (ids.untyped_storage().data_ptr(), ids._version, ids.storage_offset(), tuple(ids.shape), ids.device)
        if key != self.key:
            rows, cols = (int(value) + 1 for value in ids[:num_tokens, 1:3].amax(dim=0).tolist())
            self.key, self.grid = key, (rows, cols)  # a grid that does not fit leaves the blocks unmerged, warned
        return self.grid

    def _traced(self, num_tokens: int) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == num_tokens:
            return self.grid
        return self._square(num_tokens)

    @staticmethod
    def _square(num_tokens: int) -> tuple[int, int]:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"agentsd cannot tell the token grid of a traced Flux call with {num_tokens} image tokens: run "
                "the patched model once eagerly at this size before compiling it (img_ids is read then)"
            )
        return side, side
