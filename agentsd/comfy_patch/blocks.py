"""What the AgentSD patches do inside a ComfyUI transformer block, at each UNet call.

ComfyUI's ``BasicTransformerBlock`` offers three points around self-attention, in this order:
``attn1_patch`` (after ``norm1``), ``attn1_replace`` (the attention itself, on the projected
``q, k, v``) and ``attn1_output_patch`` (after ``to_out``). AgentSD uses them as the diffusers
adapter uses its stage forward:

1. ``norm1``'s input is the block input, the similarity metric of the paper and of the diffusers
   adapter; a twin of ``norm1`` (an object patch, so ComfyUI puts the original back) hands it to
   the block's state (:func:`input_recorder`).
2. ``attn1_patch`` plans the block's merges from it and merges ``norm1(x)``. With agents, the agent
   tokens ride after the merged tokens in the query input, so that the layer's own ``to_q``
   projects both (context and value stay the merged tokens).
3. ``attn1_replace`` splits the queries again and runs :func:`agentsd.attention.agent_attention`;
   without agents it runs the attention the layer would have run (or the replace that was there).
4. ``attn1_output_patch`` gives every token the output of the token it was merged into.

The call's phase, random keys and latent size are worked out once per UNet call, by the first
patched block that runs (:class:`ModelState`), from what ComfyUI passes every block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_sampling
import torch

from ..attention import AgentSettings, agent_attention
from ..config import AgentSDConfig, Phase
from ..layout import draw_keys
from ..merge import MergePlan, make_layout, make_plan
from ..schedule import edm_noise_level, phase_index
from .twins import twin

logger = logging.getLogger("agentsd")

#: ``(block name, number, index in its spatial transformer)``: how ComfyUI names a transformer block
#: in ``extra_options`` and in ``attn1_replace`` patches, e.g. ``("input", 1, 0)``.
BlockKey = tuple[str, int, int]

#: Where AgentSD's state sits in a patched model's ``transformer_options``.
OPTIONS_KEY = "agentsd"


def block_key(extra_options: dict[str, Any]) -> BlockKey | None:
    """The key of the block a patch is called for, or ``None`` outside a UNet's named blocks."""
    block = extra_options.get("block")
    return None if block is None else (block[0], block[1], extra_options.get("block_index", 0))


def noise_level(model_sampling: Any, timestep: float) -> float:
    """The noise level (:mod:`agentsd.schedule`) of the timestep a model's sampling gives a sigma.

    Discrete sampling (SD's own, and its v-prediction, LCM and zero-SNR variants) gives a training
    timestep; EDM sampling gives ``c_noise = log(sigma) / 4``, which is mapped onto SD's schedule.
    Flow matching (SD3, Flux) gives ``sigma * multiplier`` (Flux dev: sigma): its noise level is
    sigma, as the diffusers patch reads its flow-matching schedulers.
    """
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return timestep / model_sampling.multiplier
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux):
        return timestep
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and not isinstance(
        model_sampling, comfy.model_sampling.ModelSamplingDiscreteEDM
    ):
        return timestep / model_sampling.num_timesteps
    return float(edm_noise_level(torch.tensor(timestep)))


def phase_of_call(config: AgentSDConfig, model_sampling: Any, timestep: torch.Tensor) -> tuple[int, Phase]:
    """The index and phase of the model call given ``timestep`` (0-d: what the model's sampling made of
    its sigma); one host read. Logged at DEBUG level."""
    value = float(timestep)
    level = noise_level(model_sampling, value)
    index = phase_index(config.phases, level)
    phase = config.phases[index]
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("agentsd: timestep %g, noise level %.3f: phase %d, %s", value, level, index, phase.describe())
    return index, phase


@dataclass(frozen=True)
class BlockRun:
    """What a block did at its last call: the phase's index, and whether it merged and used agents."""

    phase: int
    merged: bool
    agents: bool


@dataclass(eq=False)
class BlockState:
    """One patched transformer block and its plan for the current call.

    Attributes:
        model: The state shared by the model's patched blocks.
        index: Position among the patched blocks (part of its random key, as in the diffusers adapter).
        downsample: Its resolution level (1 = the latent's).
        name: Its path in the diffusion model.
        previous_replace: The ``attn1_replace`` the block had before AgentSD, if any: it keeps
            running (on merged tokens), and the block runs ToMe, as the diffusers adapter does for a
            processor it cannot stand in for.
        metric: This call's block input, from ``norm1``'s twin.
        plan: This call's merge plan, from ``attn1_patch`` to ``attn1_output_patch``.
        agents_in_queries: How many agent tokens ride after the merged queries, or 0.
        last_run: What it did at its last call.
    """

    model: ModelState
    index: int
    downsample: int
    name: str
    previous_replace: Callable[..., torch.Tensor] | None = None
    metric: torch.Tensor | None = None
    plan: MergePlan | None = None
    agents_in_queries: int = 0
    last_run: BlockRun | None = None

    def __deepcopy__(self, memo: dict) -> BlockState:
        return self  # shared by the clones of a patched model, as its state is (ModelState.__deepcopy__)

    def merge(
        self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``attn1_patch``: plan this call's merges from the block input and merge ``n = norm1(x)``.

        Returns:
            The queries' input (merged tokens, then the agent tokens when agents run), context and value.
        """
        metric, self.metric = self.metric, None
        if metric is None:  # another object patch replaced norm1: plan from norm1(x), as ComfyUI's ToMe does
            metric = n
        if metric.shape[1] != n.shape[1]:
            raise RuntimeError(
                f"AgentSD: block {self.name} got {n.shape[1]} tokens where its input had {metric.shape[1]}: "
                "a node before it merges tokens too (ComfyUI's ToMe node?); use one token-merging node"
            )
        phase, index = self.model.start_call(extra, n)
        layout = make_layout(self.model.grid(self.downsample), phase, self.model.key(self.index), n.device)
        self.plan = make_plan(phase, layout, metric)
        if self.plan is None:
            self.last_run = BlockRun(index, merged=False, agents=False)
            return n, context, value
        merged = self.plan.merge(n)
        plain = context is n and value is n
        with_agents = plain and self.plan.agents is not None and self.previous_replace is None
        self.last_run = BlockRun(index, merged=True, agents=with_agents)
        if not plain:  # another patch gave attn1 a context of its own: only the queries are merged
            return merged, context, value
        if with_agents:
            agent_tokens = self.plan.agents.merge(n)
            self.agents_in_queries = agent_tokens.shape[1]
            return torch.cat([merged, agent_tokens], dim=1), merged, merged
        return merged, merged, merged

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        """``attn1_replace``: agent attention when agents ride in the queries, else the attention
        the layer would run (or the replace that was there)."""
        agents, self.agents_in_queries = self.agents_in_queries, 0
        if agents and q.shape[1] != k.shape[1] + agents:
            raise RuntimeError(_stacked(self.name))
        if not agents:
            if self.previous_replace is not None:
                return self.previous_replace(q, k, v, extra)
            return comfy_attention.optimized_attention(
                q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"), transformer_options=extra
            )
        heads = extra["n_heads"]
        per_head = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q[:, :-agents], k, v, q[:, -agents:])]
        settings = self.model.agents
        upcast = settings.upcast or extra.get("attn_precision") == torch.float32
        out = agent_attention(*per_head, settings.k_scale2, settings.k_shortcut, upcast=upcast)
        return out.transpose(1, 2).flatten(2)

    def unmerge(self, n: torch.Tensor) -> torch.Tensor:
        """``attn1_output_patch``: every token takes the output of the token it went into."""
        plan, self.plan = self.plan, None
        if plan is None:
            return n
        merged, agents, self.agents_in_queries = plan.tokens.num_merged, self.agents_in_queries, 0
        if agents and n.shape[1] == merged + agents:
            # A replace set after AgentSD's ran instead of it, on the queries with the agents in
            # them: their rows are dropped, and the block ran ToMe.
            n = n[:, :merged]
            self.last_run = BlockRun(self.last_run.phase, merged=True, agents=False)
        elif n.shape[1] != merged:
            raise RuntimeError(_stacked(self.name))
        return plan.unmerge(n)


def _stacked(name: str) -> str:
    return (
        f"AgentSD: the tokens of block {name} were merged again after AgentSD merged them (ComfyUI's ToMe node "
        "applied after AgentSD?); use one token-merging node"
    )


@dataclass(eq=False)
class ModelState:
    """What every patched block of one model needs to know about the current UNet call.

    Attributes:
        config: The settings in force.
        base_model: ComfyUI's model (``ModelPatcher.model``), shared by all its clones: its
            ``model_sampling`` is read at each call, so a sampling override set later is followed.
        blocks: The patched blocks, by key.
        agents: Agent attention's settings.
        call_marker: ``original_shape`` of the current call: ComfyUI makes it anew for each UNet call.
        phase: The current call's phase.
        phase_index: Its index in the schedule.
        timestep: The current call's timestep, a 0-d float32 tensor on the model's device.
        keys: The current call's random keys, one per patched block, or ``None`` for fixed destinations.
        latent_size: (H, W) of the current call's latent.
    """

    config: AgentSDConfig
    base_model: Any
    blocks: dict[BlockKey, BlockState] = field(default_factory=dict)
    agents: AgentSettings = field(init=False)
    call_marker: list | None = None
    phase: Phase | None = None
    phase_index: int = 0
    timestep: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    latent_size: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.agents = AgentSettings.of(self.config)

    def __deepcopy__(self, memo: dict) -> ModelState:
        # ComfyUI deep-copies a model's options (which hold these patches) at every clone; the clones
        # of a patched model share its blocks' object patches, so they share this state too.
        return self

    def merge(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict[str, Any]):
        """The ``attn1_patch``: the block's merge, for a patched block."""
        block = self.blocks.get(block_key(extra))
        return (n, context, value) if block is None else block.merge(n, context, value, extra)

    def unmerge(self, n: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        """The ``attn1_output_patch``: the block's unmerge, for a patched block."""
        block = self.blocks.get(block_key(extra))
        return n if block is None else block.unmerge(n)

    def start_call(self, extra: dict[str, Any], n: torch.Tensor) -> tuple[Phase, int]:
        """This call's phase (and its index), worked out by its first patched block."""
        shape = extra["original_shape"]
        if shape is not self.call_marker:
            self.call_marker = shape
            sampling, sigmas = self.base_model.model_sampling, extra.get("sigmas")
            if sigmas is None:  # called outside ComfyUI's samplers: no noise level, so the cleanest phase
                timestep = torch.zeros((), device=n.device)
                self.phase_index = phase_index(self.config.phases, 0.0)
                self.phase = self.config.phases[self.phase_index]
            else:
                timestep = sampling.timestep(sigmas.flatten()[:1]).to(device=n.device, dtype=torch.float32)[0]
                self.phase_index, self.phase = phase_of_call(self.config, sampling, timestep)
            self.timestep = timestep
            self.latent_size = (shape[-2], shape[-1])
            # As in the diffusers adapter: an odd batch cannot hold whole (cond, uncond) pairs.
            use_rand = self.config.use_rand and n.shape[0] % 2 == 0
            self.keys = draw_keys(self.config.seed, timestep, len(self.blocks)) if use_rand else None
        return self.phase, self.phase_index

    def grid(self, downsample: int) -> tuple[int, int]:
        """(h, w) of the token grid at ``downsample`` in the current call."""
        h, w = (math.ceil(side / downsample) for side in self.latent_size)
        return h, w

    def key(self, index: int) -> torch.Tensor | None:
        return self.keys[index] if self.keys is not None else None


class _RecordsInput:
    """Mixed into a twin of a block's ``norm1``: hands its input (the block input) to the block."""

    agentsd_block: BlockState

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.agentsd_block.metric = x
        return super().forward(x, *args, **kwargs)


def input_recorder(norm: torch.nn.Module, block: BlockState) -> torch.nn.Module:
    """A twin of ``norm`` that records its input for ``block``: the object ComfyUI patches in
    (:func:`~agentsd.comfy_patch.twins.twin`)."""
    return twin(norm, _RecordsInput, block)
