"""The public API on diffusers models: apply, remove, inspect and compile the AgentSD patch.

:func:`apply_patch` finds the model's blocks (:func:`select_blocks`: a UNet's spatial transformer
blocks, a diffusion transformer's blocks), puts a patched ``forward`` on the model, on each selected
block and on each of its merging layers (``agentsd.diffusers_patch.forwards``), and keeps the list
of what it changed on the model, so that
:func:`remove_patch` restores the model exactly. No attention processor is replaced:
``unet.attn_processors``, ``set_attn_processor``, ``state_dict`` and ``save_attn_procs`` see the
user's processors, with their weights, while the patch is on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import AgentSDConfig
from .backbones import backbone_of, find_backbone
from .blocks import choose_sites, merging_stages, transformer_blocks, unsupported_blocks
from .forwards import Override, UNetForward
from .models import attention_without_blocks, refuse_unsupported, temporal_block_count
from .state import BlockState, UNetState
from .summary import PatchSummary, summarize
from .timesteps import NoiseRule, model_unit

logger = logging.getLogger("agentsd")

#: The UNet attribute that holds its :class:`Patch`.
PATCH_ATTRIBUTE = "_agentsd_patch"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


@dataclass(eq=False)
class Patch:
    """Everything one :func:`apply_patch` changed on a UNet.

    Attributes:
        state: The UNet's per-call state.
        overrides: Every module whose ``forward`` was replaced, in the order they were.
        max_downsample: The coarsest level patched.
        total_blocks: The model's transformer blocks (a UNet's spatial ones), patched or not.
        temporal_blocks: Its temporal transformer blocks (tokens = frames), never patched.
    """

    state: UNetState
    overrides: list[Override] = field(default_factory=list)
    max_downsample: int = 1
    total_blocks: int = 0
    temporal_blocks: int = 0

    @property
    def unet_forward(self) -> UNetForward:
        """The UNet's patched forward (the first override)."""
        return self.overrides[0].installed.call


def get_patch(unet: torch.nn.Module) -> Patch | None:
    return unet.__dict__.get(PATCH_ATTRIBUTE)


#: Instance attributes that make ``copy.deepcopy`` and pickle treat a patched UNet as such.
COPY_RULES = ("__deepcopy__", "__reduce_ex__")


def _set_copy_rules(unet: torch.nn.Module) -> None:
    """A deep copy of ``unet`` becomes an independent patched UNet; pickling it is refused with a reason.

    The patched forwards of the blocks are closures (see ``forwards``), which ``copy.deepcopy`` would
    share between the copy and the original and pickle cannot save: the copy gets its own, and
    pickling says what to do instead.
    """
    unet.__deepcopy__ = lambda memo: _deepcopy_patched(unet, memo)
    unet.__reduce_ex__ = _refuse_pickling


def _deepcopy_patched(unet: torch.nn.Module, memo: dict) -> torch.nn.Module:
    rules = {name: unet.__dict__.pop(name) for name in COPY_RULES}
    try:
        twin = copy.deepcopy(unet, memo)
    finally:
        unet.__dict__.update(rules)
    for override in get_patch(twin).overrides:  # the copy's modules and states, the original's forwards
        override.put(stale=override.installed)
    _set_copy_rules(twin)
    return twin


def _refuse_pickling(protocol: int) -> Any:
    raise TypeError(
        "a UNet patched by agentsd cannot be pickled (torch.save(unet)): call agentsd.remove_patch(unet) "
        "before saving and agentsd.apply_patch after loading; unet.save_pretrained(...) and "
        "torch.save(unet.state_dict()) work while patched"
    )


def apply_patch(model: Any, config: AgentSDConfig | None = None, **knobs: Any) -> Any:
    """Make a Stable Diffusion pipeline, UNet or diffusion transformer generate with AgentSD.

    Args:
        model: A diffusers pipeline with a ``.unet`` (SD 1.x, 2.x, SDXL; text-to-image,
            image-to-image, inpainting, ControlNet, PAG, AnimateDiff, Stable Video Diffusion, ...) or
            its UNet; or a
            pipeline with a ``.transformer`` (SD3 / SD3.5, Flux, PixArt-α/Σ and their image-to-image,
            inpainting and ControlNet variants) or that transformer.
        config: The settings; or pass them as keywords (``ratio=0.4``, ``schedule="fixed"``, ...),
            see :class:`AgentSDConfig`. Not both.

    Returns:
        ``model``, patched in place. Applying again replaces the previous patch; everything is
        checked before anything changes, so a failed call leaves the model as it was.
    """
    if config is not None and knobs:
        raise TypeError(f"pass either config or keyword settings, not both (got config and {sorted(knobs)})")
    if config is not None and not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an agentsd.AgentSDConfig, got {type(config).__name__}")
    config = config if config is not None else AgentSDConfig(**knobs)
    unet = find_backbone(model)
    backbone = backbone_of(unet)
    refuse_unsupported(model, unet)
    sites = transformer_blocks(unet)
    others = unsupported_blocks(unet) if backbone.family == "UNet" else []
    if not sites:
        found = (
            f"its transformer blocks are {', '.join(others)}, which AgentSD does not support"
            if others
            else attention_without_blocks(unet)
        )
        raise ValueError(f"{type(unet).__name__} has no BasicTransformerBlock to patch; {found}")
    if others:
        warnings.warn(
            f"agentsd patches only BasicTransformerBlocks; this model's {', '.join(others)} blocks stay unpatched",
            stacklevel=2,
        )
    max_downsample = config.max_downsample or min(site.downsample for site in sites)
    chosen = choose_sites(sites, max_downsample, config.blocks)
    stages_of = {id(site.module): merging_stages(config, site.module) for site in chosen}
    scheduler_config = getattr(getattr(model, "scheduler", None), "config", None)
    num_train_timesteps = config.num_train_timesteps or getattr(
        scheduler_config, "num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS
    )
    owner = weakref.ref(model) if model is not unet else None

    remove_patch(unet)
    rule = NoiseRule(num_train_timesteps, owner, backbone.timestep_scale, model_unit=model_unit(unet))
    state = UNetState(config=config, rule=rule, backbone=backbone)
    temporal = temporal_block_count(unet, [site.module for site in sites])
    patch = Patch(state, max_downsample=max_downsample, total_blocks=len(sites), temporal_blocks=temporal)
    patch.overrides.append(Override(unet, "unet", state).install())
    for site in sites:
        stages = stages_of.get(id(site.module))
        if not stages:
            continue
        block = BlockState(
            unet=state,
            index=len(state.blocks),
            downsample=site.downsample,
            name=site.name,
            last_stage=stages[-1][0],
            attention=next((name for name, kind in stages if kind in ("self", "joint")), stages[0][0]),
            cross_only=bool(getattr(site.module, "only_cross_attention", False)),
        )
        state.blocks.append(block)
        patch.overrides.append(Override(site.module, "block", block).install())
        for stage, kind in stages:
            patch.overrides.append(Override(getattr(site.module, stage), stage, block, kind).install())
    setattr(unet, PATCH_ATTRIBUTE, patch)
    _set_copy_rules(unet)
    if not state.blocks:
        levels = "/".join(map(str, sorted({site.downsample for site in sites})))
        why = (
            f"max_downsample={max_downsample} is below every attention level of this model (downsample {levels}); "
            "pass a larger max_downsample, or None for the top attention level"
            if all(site.downsample > max_downsample for site in sites)
            else "merge_attn, merge_crossattn and merge_mlp are all False, or blocks chose no block"
        )
        warnings.warn(f"agentsd patched none of the {len(sites)} transformer blocks: {why}", stacklevel=2)
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", patch_summary(model))
    return model


def remove_patch(model: Any) -> Any:
    """Undo :func:`apply_patch`: every patched ``forward`` gone, the model as it was. A no-op on an
    unpatched model."""
    unet = find_backbone(model)
    patch = get_patch(unet)
    if patch is None:
        return model
    for override in reversed(patch.overrides):
        override.remove()
    for name in (PATCH_ATTRIBUTE, *COPY_RULES):
        unet.__dict__.pop(name, None)
    return model


@contextlib.contextmanager
def patched(model: Any, config: AgentSDConfig | None = None, **knobs: Any) -> Iterator[Any]:
    """``with agentsd.patched(pipe, ratio=0.4): ...``: AgentSD inside the block, the model as it was after.

    The patch comes off on exit, errors included; a patch the model carried before is put back.
    """
    unet = find_backbone(model)
    before = get_patch(unet)
    apply_patch(model, config, **knobs)
    try:
        yield model
    finally:
        remove_patch(model)
        if before is not None:
            apply_patch(model, before.state.config)


def compile_unet(model: Any, **compile_kwargs: Any) -> Any:
    """``torch.compile`` a patched UNet so that CUDA graphs (``mode="reduce-overhead"``) can capture it whole.

    ``torch.compile(pipe.unet, fullgraph=True)`` works on a patched UNet too, with every phase a branch
    of a ``torch.cond``; but inductor runs a graph holding a ``torch.cond`` on CUDA without CUDA graphs.
    Here the UNet's patched forward stays outside the compiled code and picks each call's phase on the
    host; the rest of the call is compiled for that phase, with no ``torch.cond``: a graph per phase
    (each compiled the first time its phase runs), whole, which CUDA graphs capture. The graphs are
    static: with dynamic shapes the phase's numbers would become graph inputs, which a compile region
    cannot take.

    Args:
        model: A pipeline or UNet patched by :func:`apply_patch`.
        **compile_kwargs: ``torch.compile``'s own (``mode``, ``fullgraph``, ``backend``, ...); ``dynamic``
            only ``False``.

    Returns:
        ``model``, its UNet compiled in place. :func:`remove_patch` drops the compiled code with the
        patch; :func:`apply_patch` again starts uncompiled.
    """
    unet = find_backbone(model)
    patch = get_patch(unet)
    if patch is None:
        raise ValueError(
            f"compile_unet compiles a UNet patched by agentsd; {type(model).__name__} is not patched: call "
            "agentsd.apply_patch(model, ...) first (an unpatched UNet needs only torch.compile)"
        )
    dynamic = compile_kwargs.setdefault("dynamic", False)
    if dynamic is not False:
        raise ValueError(
            f"compile_unet compiles static graphs, one per phase: dynamic must be False (the default), got "
            f"{dynamic!r} (a new image size or batch compiles new graphs)"
        )
    patch.unet_forward.compiled = torch.compile(patch.unet_forward.phase_forward, **compile_kwargs)
    return model


def _unet_or_none(model: Any) -> torch.nn.Module | None:
    try:
        return find_backbone(model)
    except TypeError:
        return None


def is_patched(model: Any) -> bool:
    """Whether ``model`` (a pipeline or UNet) carries an AgentSD patch; ``False`` for anything without a UNet."""
    unet = _unet_or_none(model)
    return unet is not None and get_patch(unet) is not None


def patch_summary(model: Any) -> PatchSummary | None:
    """The blocks AgentSD patched in ``model``, the settings in force and what ran, or ``None`` if unpatched.

    A :class:`PatchSummary` is data (``.blocks``, ``.config``, ``.steps``, ...); ``print()`` of it gives
    the few lines a notebook shows. ``None`` for an unpatched model, so ``if agentsd.patch_summary(pipe):``
    reads as ``is_patched``.
    """
    unet = find_backbone(model)
    patch = get_patch(unet)
    if patch is None:
        return None
    owner = model if model is not unet else (patch.state.rule.owner() if patch.state.rule.owner else None)
    return summarize(
        patch.state, patch.max_downsample, patch.total_blocks, owner, type(unet).__name__, patch.temporal_blocks
    )
