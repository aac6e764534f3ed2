"""Which diffusers UNets AgentSD patches, which parts of them, and why it refuses the others.

AgentSD merges the tokens of an image grid, in the self-attention of ``BasicTransformerBlock``s.
Those blocks sit in a UNet's spatial transformers: ``Transformer2DModel`` (SD 1.x, 2.x, SDXL, and
the spatial layers of AnimateDiff, ModelScope text-to-video and I2VGen-XL) and the spatial half of
Stable Video Diffusion's ``TransformerSpatioTemporalModel``. In a video UNet the frames are batch
entries there, so each frame is merged on its own. Temporal blocks, whose tokens are the frames of
one pixel (SVD's ``TemporalBasicTransformerBlock``, AnimateDiff's motion modules), are never patched.

Refused, with the reason: audio UNets (AudioLDM, AudioLDM 2, MusicLDM), whose tokens are a
spectrogram's; and UNets without a ``BasicTransformerBlock`` (DeepFloyd IF, Kandinsky 2.2), whose
message names the attention they have instead.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

#: Modules whose ``transformer_blocks`` attend over the pixels of one feature map (one frame).
SPATIAL_TRANSFORMERS = (Transformer2DModel, TransformerSpatioTemporalModel)

#: Transformer block classes whose tokens are frames: temporal by design, never patched nor warned about.
TEMPORAL_BLOCKS = frozenset({"TemporalBasicTransformerBlock"})

#: Audio models, by class name (UNet or pipeline), and why AgentSD refuses them.
AUDIO_REASON = (
    "its tokens are a spectrogram's (time x mel frequency), not an image's pixels: AgentSD's merging cells and "
    "recipe are made and checked for images and video frames, so audio models are not supported"
)
AUDIO_MODELS = frozenset({"AudioLDM2UNet2DConditionModel", "AudioLDMPipeline", "AudioLDM2Pipeline", "MusicLDMPipeline"})


def refuse_unsupported(model: Any, unet: torch.nn.Module) -> None:
    """Raise if ``model`` (a pipeline or UNet) or its ``unet`` is one AgentSD refuses by kind.

    Raises:
        TypeError: An audio model (AudioLDM, AudioLDM 2, MusicLDM); the message names it and says why.
    """
    for part in (model, unet):
        name = type(part).__name__
        if name in AUDIO_MODELS:
            raise TypeError(f"{name} is an audio model: {AUDIO_REASON}")


def temporal_block_count(unet: torch.nn.Module, spatial: list[torch.nn.Module]) -> int:
    """How many transformer blocks of ``unet`` are temporal: every ``BasicTransformerBlock`` that is not one
    of the ``spatial`` ones (AnimateDiff's motion modules, ModelScope's and I2VGen-XL's temporal
    transformers), and every ``TemporalBasicTransformerBlock`` (SVD's)."""
    spatial_ids = {id(block) for block in spatial}
    return sum(
        1
        for module in unet.modules()
        if (isinstance(module, BasicTransformerBlock) and id(module) not in spatial_ids)
        or type(module).__name__ in TEMPORAL_BLOCKS
    )


def attention_without_blocks(unet: torch.nn.Module) -> str:
    """What attention ``unet`` has, for the message of a UNet with no ``BasicTransformerBlock`` to patch.

    DeepFloyd IF's and Kandinsky 2.2's UNets attend in ``SimpleCrossAttn`` blocks through added-KV
    attention: the text (or image embedding) projected by ``add_k_proj``/``add_v_proj`` and the pixels
    in one softmax, with no self-attention of their own that agents could stand in for.
    """
    layers = [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]
    if not layers:
        return "it has no attention layer"
    parents = sorted({type(_holder(unet, name)).__name__ for name, _ in layers})
    added_kv = [module for _, module in layers if getattr(module, "added_kv_proj_dim", None) is not None]
    processors = sorted({type(module.processor).__name__ for _, module in layers})
    if added_kv:
        return (
            f"its attention is added-KV attention ({len(added_kv)} Attention layers with added_kv_proj_dim, "
            f"{', '.join(processors)}, in {', '.join(parents)}: the pixels and the conditioning in one softmax, "
            "as in DeepFloyd IF and Kandinsky 2.2), which AgentSD does not support"
        )
    return f"its attention layers ({', '.join(processors)}, in {', '.join(parents)}) are not in transformer blocks"


def _holder(unet: torch.nn.Module, name: str) -> torch.nn.Module:
    """The UNet block that holds attention layer ``name`` (``down_blocks.1`` for ``down_blocks.1.attentions.0``)."""
    path = name.rpartition(".attentions.")[0] or name.rpartition(".")[0]
    return unet.get_submodule(path) if path else unet
