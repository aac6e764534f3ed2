"""AgentSD on ComfyUI's diffusion transformers: SD3 / SD3.5 (MMDiT) and Flux (dev, schnell, fill).

:func:`apply_dit` patches a clone through ComfyUI's own patch points: a ``dit`` block replacement per
block (``set_model_patch_replace``), object patches of the image stream's attention projections, and
an ``APPLY_MODEL`` wrapper that starts each call (:mod:`agentsd.comfy_patch.dit_blocks`). Every block
sees the whole token grid, so every block is patched by default, as in the diffusers patch; blocks
are numbered in the order they run (Flux: double blocks, then single blocks), which is what their
random destinations are drawn from.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.supported_models as families
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
from comfy.patcher_extension import WrappersMP

from ..config import AgentSDConfig
from ..schedule import phase_spans
from ..selection import BlockSite, select_sites
from .blocks import OPTIONS_KEY
from .dit_blocks import DiTBlock, DiTState, MergesInput, SplitsProjection, UnmergesOutput
from .twins import twin

logger = logging.getLogger("agentsd")


def is_supported_dit(model: Any) -> bool:
    """Whether a ``ModelPatcher`` holds SD3 / SD3.5 or Flux (dev, schnell, fill; not Flux 2) as ComfyUI builds them."""
    config, diffusion_model = model.model.model_config, model.model.diffusion_model
    if isinstance(config, families.SD3):
        return type(diffusion_model) is OpenAISignatureMMDITWrapper
    flux2 = getattr(families, "Flux2", ())
    return isinstance(config, families.Flux) and not isinstance(config, flux2) and type(diffusion_model) is Flux


def dit_sites(diffusion_model: Any) -> list[BlockSite]:
    """The blocks of an MMDiT or Flux model in running order, each at its token grid's downsample
    factor (the diffusers patch's: SD3's patch size, 1 for Flux, whose tokens are its grid)."""
    if isinstance(diffusion_model, Flux):
        return [BlockSite(f"double_blocks.{i}", block, 1) for i, block in enumerate(diffusion_model.double_blocks)] + [
            BlockSite(f"single_blocks.{i}", block, 1) for i, block in enumerate(diffusion_model.single_blocks)
        ]
    patch = diffusion_model.patch_size
    return [BlockSite(f"joint_blocks.{i}", block, patch) for i, block in enumerate(diffusion_model.joint_blocks)]


def _twins(site: BlockSite) -> list[tuple[str, type]]:
    """The layers of a block that AgentSD twins, by path under the block, with the twin's kind."""
    if site.name.startswith("single_blocks"):
        return [("linear1", SplitsProjection)]
    if site.name.startswith("double_blocks"):
        return [("img_attn.qkv", MergesInput), ("img_attn.proj", UnmergesOutput)]
    layers = ["attn", "attn2"] if site.module.x_block.x_block_self_attn else ["attn"]
    return [
        (f"x_block.{name}.{part}", kind)
        for name in layers
        for part, kind in (("qkv", MergesInput), ("proj", UnmergesOutput))
    ]


def apply_dit(model: Any, config: AgentSDConfig, family: str) -> Any:
    """A clone of ComfyUI model ``model`` (SD3 / SD3.5 or Flux) that runs AgentSD; ``model`` is left as it is.

    Raises:
        ValueError: The engine has no model wrappers, or ``config.max_downsample`` selects no block.
    """
    if not hasattr(model, "add_wrapper_with_key"):
        raise ValueError("AgentSD on SD3 and Flux needs a ComfyUI with model wrappers (December 2024 or newer)")
    diffusion_model = model.model.diffusion_model
    sites = select_sites(dit_sites(diffusion_model), config.max_downsample)
    if not sites:
        raise ValueError(
            f"max_downsample {config.max_downsample} selects no block of this {family} model: its blocks see "
            f"the latent at downsample {dit_sites(diffusion_model)[0].downsample}; use auto"
        )
    flux = isinstance(diffusion_model, Flux)
    patched = model.clone()
    state = DiTState(config, model.model, patch_size=diffusion_model.patch_size, guidance_batch=not flux)
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for index, site in enumerate(sites):
        kind, number = site.name.split(".")
        key = ("single_block" if kind == "single_blocks" else "double_block", int(number))
        block = DiTBlock(state, index, site.name, single=kind == "single_blocks", previous_replace=replaces.get(key))
        state.blocks.append(block)
        for path, mixin in _twins(site):
            name = f"diffusion_model.{site.name}.{path}"
            layer = twin(model.get_model_object(name), mixin, block)
            if mixin is SplitsProjection:
                layer.agentsd_split = 3 * site.module.hidden_size
            patched.add_object_patch(name, layer)
        patched.set_model_patch_replace(block, "dit", *key)
    patched.model_options.setdefault("transformer_options", {})[OPTIONS_KEY] = state
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, OPTIONS_KEY, state.wrapper)
    logger.info("agentsd: %s", describe(state, family, sites))
    return patched


def describe(state: DiTState, family: str, sites: list[BlockSite]) -> str:
    """One line: which blocks run what, in which span of the schedule (t = 1000 sigma, as diffusers'
    flow-matching schedulers count)."""
    kinds: dict[str, int] = {}
    for site in sites:
        kinds[site.name.split(".")[0]] = kinds.get(site.name.split(".")[0], 0) + 1
    blocks = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in kinds.items())
    spans = phase_spans(state.config.phases, 1000)
    phases = "; ".join(f"{span}: {phase.describe()}" for span, phase in zip(spans, state.config.phases))
    return f"{family}, {blocks}; {phases}"
