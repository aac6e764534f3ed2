"""ToDo, token downsampling (Smith, Saxena & Saha 2024, arXiv 2402.13573), on a diffusers UNet: a peer of AgentSD.

In the self-attention (``attn1``) of the transformer blocks at the chosen resolution levels, every
query is kept, and the keys and values are computed from the hidden states downsampled on the 2-D
token grid (``F.interpolate`` to ``int(h / factor) x int(w / factor)``). Nothing is merged or
unmerged: the queries attend sparsely to the image, so attention costs ``N * N / factor**2``.

Written here from the paper's description (the authors' reference, ImprovedTokenMerge, hooks
``to_k`` / ``to_v`` with PyTorch hooks; ports exist for kohya sd-scripts, A1111 and ComfyUI) with
diffusers' own machinery:

* a hook on the UNet (:class:`ToDoHook`, ``diffusers.hooks``) reads the latent size from ``sample``
  and, with a stop fraction, the noise level from ``timestep`` (positional or keyword) before every
  call; on at every step (the default), ``torch.compile(unet, fullgraph=True)`` traces it whole;
* an attention processor (:class:`ToDoAttnProcessor`) on each chosen ``attn1``, set with
  ``set_processor``, which hands the call to the processor it replaced whenever it does not
  downsample: factor 1, grid too small to shrink, a token count that is not the grid's (an odd
  call), a mask or an ``encoder_hidden_states`` (not plain self-attention), or the step fraction over.

The knobs and their checks live in ``methods.MethodOptions`` (``--todo-*``); the registry
(``methods.py``) turns them into the per-level factors that :func:`apply_todo` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention

# AgentSD's own level of each transformer block and reading of the UNet's call, so that both patch the same layers.
from agentsd import select_blocks
from agentsd.diffusers_patch.api import DEFAULT_NUM_TRAIN_TIMESTEPS
from agentsd.diffusers_patch.blocks import stage_kinds
from agentsd.diffusers_patch.forwards import call_argument as _call_argument

# The layer's own projections and output, as AgentSD's agent attention uses them.
from agentsd.diffusers_patch.layers import layer_keys_values, layer_output, layer_queries

HOOK_NAME = "todo"


@dataclass
class ToDoState:
    """What every ToDo processor of one UNet needs to know about the current call (set by :class:`ToDoHook`).

    Attributes:
        stop_after: Fraction of the denoising during which ToDo is on: while ``timestep >= (1 -
            stop_after) * num_train_timesteps`` (the noise level, as the authors' reference
            implementation does, rather than a call count: a call at a given noise level is
            downsampled or not whatever ran before it).
        num_train_timesteps: The scheduler's ``num_train_timesteps``, in the model's unit (Flux, whose
            pipelines pass ``t / 1000``: 1).
        mode: The ``F.interpolate`` mode.
        size: The (H, W) grid at downsample 1 in the current call: a UNet's latent, a transformer's
            image tokens.
        active: Whether the current call is within ``stop_after``.
    """

    stop_after: float = 1.0
    num_train_timesteps: float = DEFAULT_NUM_TRAIN_TIMESTEPS
    mode: str = "nearest-exact"
    size: tuple[int, int] | None = None
    active: bool = True

    def start_call(self, size: tuple[int, int], timestep: torch.Tensor | float) -> None:
        self.size = size
        if self.stop_after >= 1:
            # On at every step (the default): the timestep is not read, so a compiled model stays one graph.
            self.active = True
            return
        # A stop fraction reads the timestep on the host, as the reference does: under torch.compile,
        # one graph break per call.
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self.active = t >= (1 - self.stop_after) * self.num_train_timesteps


#: What a model's call says ToDo needs: ``read(module, args, kwargs)`` -> (:attr:`ToDoState.size`, timestep).
CallReader = Callable[[torch.nn.Module, tuple, dict], tuple[tuple[int, int], Any]]


def unet_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[int, int], Any]:
    """A UNet call's latent size (from ``sample``) and ``timestep``, positional or keyword."""
    sample = _call_argument(args, kwargs, 0, "sample")
    return (sample.shape[-2], sample.shape[-1]), _call_argument(args, kwargs, 1, "timestep")


class ToDoHook(ModelHook):
    """Starts each model call: its token grid and whether ToDo is on at this noise level."""

    def __init__(self, state: ToDoState, read: CallReader = unet_call) -> None:
        super().__init__()
        self.state = state
        self.read = read

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state.start_call(*self.read(module, args, kwargs))
        return args, kwargs


def downsampled_attention(
    attn: Attention, hidden_states: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str
) -> torch.Tensor:
    """Self-attention of ``hidden_states`` [B, h*w, C] with keys and values from its grid resized to ``size``.

    ``F.scaled_dot_product_attention`` never builds the [N, N / factor**2] matrix in memory-efficient kernels.
    """
    batch, _, channels = hidden_states.shape
    image = hidden_states.transpose(1, 2).reshape(batch, channels, *grid)
    context = F.interpolate(image, size=size, mode=mode).flatten(2).transpose(1, 2)
    key, value = layer_keys_values(attn, context)
    out = F.scaled_dot_product_attention(layer_queries(attn, hidden_states), key, value, scale=attn.scale)
    return layer_output(attn, out, hidden_states)


class ToDoAttnProcessor:
    """ToDo on one ``attn1`` at ``downsample`` times coarser than the latent, downsampling by ``factor``.

    Any call it does not downsample goes to ``inner``, the processor it replaced, unchanged.
    """

    def __init__(self, state: ToDoState, downsample: int, factor: float, inner: Callable[..., torch.Tensor]) -> None:
        self.state = state
        self.downsample = downsample
        self.factor = factor
        self.inner = inner

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plain = encoder_hidden_states is None and attention_mask is None
        grids = self.grids(hidden_states) if plain else None
        if grids is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return downsampled_attention(attn, hidden_states, *grids, self.state.mode)

    def grids(self, hidden_states: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """The (h, w) token grid of this call and the smaller one its keys come from, or ``None`` where ToDo
        leaves the call alone: off, tokens that are not that grid, or a grid the factor does not shrink."""
        if not self.state.active or self.state.size is None or hidden_states.ndim != 3:
            return None
        # A stride-2 convolution with padding 1 halves a side rounding up, level after level.
        h, w = (math.ceil(side / self.downsample) for side in self.state.size)
        size = (max(1, int(h / self.factor)), max(1, int(w / self.factor)))
        return ((h, w), size) if h * w == hidden_states.shape[1] and size != (h, w) else None


def apply_todo(
    model: Any, factors: Mapping[int, float], *, stop_after: float = 1.0, mode: str = "nearest-exact"
) -> Callable[[], None]:
    """Put ToDo on the ``attn1`` of every ``BasicTransformerBlock`` at the levels of ``factors``; returns its remove.

    Args:
        model: A diffusers pipeline with a ``.unet`` (its scheduler's ``num_train_timesteps`` is
            used; 1000 without one) or a ``UNet2DConditionModel``.
        factors: Downsample factor by level (1: latent resolution, 2: one level coarser, ...).
        stop_after, mode: See :class:`ToDoState`.

    Its remove is :func:`put_todo`'s, exact.

    Raises:
        ValueError: the UNet already carries ToDo, or no transformer block sits at those levels.
    """
    unet = getattr(model, "unet", model)
    scheduler_config = getattr(getattr(model, "scheduler", None), "config", None)
    num_train_timesteps = getattr(scheduler_config, "num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)
    refuse_twice(unet)
    attns = [
        (site.module.attn1, site.downsample)
        for site in select_blocks(unet, max_downsample=max(factors))
        if site.downsample in factors
    ]
    if not attns:
        raise ValueError(f"no transformer block at downsample {sorted(factors)} in this UNet")
    state = ToDoState(stop_after=stop_after, num_train_timesteps=num_train_timesteps, mode=mode)
    processors = [
        ToDoAttnProcessor(state, downsample, factors[downsample], attn.processor) for attn, downsample in attns
    ]
    return put_todo(unet, ToDoHook(state), [attn for attn, _ in attns], processors)


def image_attentions(block: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """The attention layers of one of AgentSD's blocks that attend over its image tokens, each with whether
    it is joint (text tokens in the same attention: SD3's ``attn``, both Flux blocks') or plain
    self-attention (a UNet's or PixArt's ``attn1``, SD3.5's ``attn2``): AgentSD's own stage kinds."""
    kinds = stage_kinds(block)
    return [(getattr(block, name), kind == "joint") for name, kind in kinds.items() if kind in ("self", "joint")]


def refuse_twice(model: torch.nn.Module) -> None:
    """Refuse, before any change, a model that already carries ToDo."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(f"this {type(model).__name__} already carries ToDo; remove it first")


def put_todo(
    model: torch.nn.Module, hook: ToDoHook, attns: Sequence[torch.nn.Module], processors: Sequence[Any]
) -> Callable[[], None]:
    """Put ``hook`` on ``model`` and ``processors`` on its layers ``attns``; returns the exact remove.

    The remove puts the original processor objects back and takes the hook (and the hook registry
    and ``forward`` it created) off the model, leaving it exactly as it was.
    """
    created_registry, had_forward = getattr(model, "_diffusers_hook", None) is None, "forward" in vars(model)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    originals = [attn.processor for attn in attns]
    for attn, processor in zip(attns, processors):
        attn.set_processor(processor)

    def remove() -> None:
        for attn, original in zip(attns, originals):
            attn.set_processor(original)
        model._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        if created_registry and not model._diffusers_hook.hooks:
            del model._diffusers_hook
            if not had_forward:
                del model.forward  # the registry left the bound method as an instance attribute

    return remove
