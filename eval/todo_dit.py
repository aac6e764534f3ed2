"""ToDo, token downsampling (``todo.py``), on the diffusion transformers: SD3 / SD3.5, Flux, PixArt-alpha / Sigma.

The same rule as on a UNet, on the image attention of AgentSD's blocks (``agentsd.select_blocks``:
every block of these models; their attention layers by AgentSD's stage kinds,
``todo.image_attentions``): every query is kept, and the image tokens' keys and values are computed
from the image tokens downsampled on their grid (``F.interpolate`` by ``factor``, ``--todo-mode``).
Where the attention is joint, the text tokens keep their own keys and values, exact (``agentsd-
dit.md``: text tokens are never merged):

* plain self-attention (PixArt's ``attn1``, SD3.5's image-only ``attn2``): ``todo.ToDoAttnProcessor``,
  as on a UNet, on the patch grid (the latent's at the patch size, Flux's from its image ids);
* joint attention (:class:`ToDoJointProcessor`): SD3's ``attn`` (image, then text tokens, each stream
  with its own projections and norms), Flux's double-stream ``attn`` (text first, rotary embedding)
  and single-stream ``attn`` (one sequence, text first, through the same projections; no output
  projection, the block does it). Downsampled keys take the rotary embedding downsampled the same way:
  with the nearest modes those of the tokens kept, exactly; with averaging modes, the cell's mean.

A hook on the model (``todo.ToDoHook``) reads each call's grid and timestep as AgentSD reads them
(``agentsd``'s :class:`Backbone`: Flux's timestep is ``t / 1000``, its grid read from ``img_ids``);
the processors hand every call they do not downsample (a mask, a grid too small, a token count that
is not the grid's, past the step fraction) to the processor they replaced. The remove is exact
(``todo.put_todo``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from agentsd import select_blocks
from agentsd.diffusers_patch.api import DEFAULT_NUM_TRAIN_TIMESTEPS
from agentsd.diffusers_patch.backbones import IdsGrid, backbone_of, find_backbone

from todo import ToDoAttnProcessor, ToDoHook, ToDoState, image_attentions, put_todo, refuse_twice  # isort: skip


def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _normed(norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _resized(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str) -> torch.Tensor:
    """Tokens [..., h*w, C] of a row-major ``grid``, resized on it to ``size``: [..., size[0]*size[1], C]."""
    lead, channels = tokens.shape[:-2], tokens.shape[-1]
    image = tokens.transpose(-1, -2).reshape(-1, channels, *grid)
    small = F.interpolate(image, size=size, mode=mode).flatten(2).transpose(1, 2)
    return small.reshape(*lead, -1, channels)


class ToDoJointProcessor(ToDoAttnProcessor):
    """ToDo on one joint attention layer: the image tokens' keys and values downsampled, the text tokens'
    exact, every query kept.

    Called as the model calls the layer: SD3 and Flux double-stream with the image tokens as
    ``hidden_states`` and the text as ``encoder_hidden_states``; Flux single-stream with one sequence,
    text first, whose last ``h * w`` tokens are the image (``text_first``: Flux's order).
    """

    def __init__(
        self, state: ToDoState, downsample: int, factor: float, text_first: bool, inner: Callable[..., Any]
    ) -> None:
        super().__init__(state, downsample=downsample, factor=factor, inner=inner)
        self.text_first = text_first

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        joint = encoder_hidden_states is not None
        image, text = (hidden_states, encoder_hidden_states) if joint else self._split(hidden_states)
        grids = self.grids(image) if attention_mask is None and image is not None else None
        if grids is None:
            rope = () if image_rotary_emb is None else (image_rotary_emb,)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *rope, **kwargs)
        grid, size = grids
        small = _resized(image, grid, size, self.state.mode)
        # Text through the text stream's projections and norms where it has its own (double stream).
        stream = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
        to_q, to_k, to_v, norm_q, norm_k = (
            getattr(attn, name) for name in (stream if joint else ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        )
        parts = {
            "image": [
                _normed(attn.norm_q, _heads(attn, attn.to_q(image))),
                _normed(attn.norm_k, _heads(attn, attn.to_k(small))),
                _heads(attn, attn.to_v(small)),
            ],
            "text": [
                _normed(norm_q, _heads(attn, to_q(text))),
                _normed(norm_k, _heads(attn, to_k(text))),
                _heads(attn, to_v(text)),
            ],
        }
        order = ("text", "image") if self.text_first else ("image", "text")
        lengths = {"text": text.shape[1], "image": image.shape[1]}
        if image_rotary_emb is not None:
            for name, cos, sin in zip(order, *(t.split([lengths[n] for n in order]) for t in image_rotary_emb)):
                # Keys of downsampled tokens: the embedding downsampled as they were.
                keys = (
                    (cos, sin)
                    if name == "text"
                    else tuple(_resized(t, grid, size, self.state.mode) for t in (cos, sin))
                )
                parts[name][0] = apply_rotary_emb(parts[name][0], (cos, sin))
                parts[name][1] = apply_rotary_emb(parts[name][1], keys)
        query, key, value = (torch.cat([parts[name][i] for name in order], dim=2) for i in range(3))
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2).to(query.dtype)
        if not joint:  # Flux's single-stream block projects the whole sequence itself
            return out
        outs = dict(zip(order, out.split([lengths[name] for name in order], dim=1)))
        image_out = attn.to_out[1](attn.to_out[0](outs["image"]))
        return image_out, outs["text"] if getattr(attn, "context_pre_only", False) else attn.to_add_out(outs["text"])

    def _split(self, sequence: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image, text) tokens of a single-stream call, or (None, None) before the grid is known."""
        if self.state.size is None:
            return None, None
        tokens = math.prod(math.ceil(side / self.downsample) for side in self.state.size)
        if not 0 < tokens <= sequence.shape[1]:
            return None, None
        texts = sequence.shape[1] - tokens
        if self.text_first:
            return sequence[:, texts:], sequence[:, :texts]
        return sequence[:, :tokens], sequence[:, tokens:]


def apply_todo_dit(
    target: Any, factor: float, *, stop_after: float = 1.0, mode: str = "nearest-exact"
) -> Callable[[], None]:
    """Put ToDo on the image attention of AgentSD's blocks of a diffusion transformer; returns its exact remove.

    Args:
        target: An ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` or ``PixArtTransformer2DModel``,
            or a pipeline with one as ``.transformer``.
        factor: The downsample factor on each side of the image token grid.
        stop_after, mode: See ``todo.ToDoState`` (the noise level as AgentSD reads it: Flux's timestep
            is ``t / 1000``).

    Raises:
        TypeError: not one of those models.
        ValueError: the model already carries ToDo.
    """
    model = find_backbone(target)
    backbone = backbone_of(model)
    if backbone.family == "UNet":
        raise TypeError(f"ToDo on a diffusion transformer needs SD3, Flux or PixArt, got {type(model).__name__}")
    refuse_twice(model)
    scale = DEFAULT_NUM_TRAIN_TIMESTEPS / backbone.timestep_scale
    state = ToDoState(stop_after=stop_after, num_train_timesteps=scale, mode=mode)
    layers, processors = [], []
    for site in select_blocks(model):
        for attn, joint in image_attentions(site.module):
            layers.append(attn)
            inner = attn.processor
            processors.append(
                ToDoJointProcessor(state, site.downsample, factor, backbone.text_first, inner)
                if joint
                else ToDoAttnProcessor(state, site.downsample, factor, inner)
            )
    ids = IdsGrid()

    def read(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[int, int], Any]:
        return backbone.latent_size(args, kwargs, ids), backbone.timestep(args, kwargs)

    return put_todo(model, ToDoHook(state, read), layers, processors)
