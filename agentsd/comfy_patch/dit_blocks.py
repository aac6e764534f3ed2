"""What the AgentSD patches do inside a ComfyUI diffusion transformer (SD3 / SD3.5 MMDiT, Flux), at each call.

ComfyUI runs each block of these models through its ``dit`` block replacement, when one is set
(``transformer_options["patches_replace"]["dit"]``), with the block's arguments in a dictionary; the
attention inside calls ComfyUI's ``optimized_attention``, which defers to an
``optimized_attention_override`` in the transformer options it is given. AgentSD uses them, and twins
of a few linear layers put in by object patches, as the diffusers adapter uses its joint attention
forward (``agentsd/diffusers_patch/joint_layers.py``):

1. The model call starts in an ``APPLY_MODEL`` wrapper (:meth:`DiTState.wrapper`): the latent's size
   gives the token grid, the model's own ``model_sampling`` the noise level, hence the phase and the
   random keys (:func:`agentsd.layout.draw_keys`, one per block in running order).
2. The block replacement (:meth:`DiTBlock.__call__`) plans the merges from the block's image-token
   input and runs the block with the override in a copy of its transformer options (Flux: and with
   its rotary table ``pe`` read at the merged tokens' positions).
3. The image stream's query-key-value projection gets the merged tokens (with the agent tokens
   after them in the agent phase) from its twin (:class:`MergesInput`); the attention override
   (:meth:`DiTBlock.attend`) computes the image rows through :func:`agentsd.attention.joint_attention`
   and the text rows exactly, or, in the ToMe phase, ComfyUI's own attention on the merged tokens;
   the output projection's twin (:class:`UnmergesOutput`) gives every token the output of the token
   it went into.
4. A Flux single-stream block projects attention and MLP inputs in one layer, ``linear1``: its twin
   (:class:`SplitsProjection`) projects the queries, keys and values of the text and merged tokens
   and the MLP input of every token; the override unmerges the image rows of attention, and the MLP,
   the join and ``linear2`` run on all tokens, as in the diffusers patch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.ops
import torch
import torch.nn.functional as F

from ..attention import AgentSettings, Stream, agent_attention, joint_attention
from ..config import AgentSDConfig, Phase
from ..layout import draw_keys
from ..merge import MergePlan, make_layout, make_plan
from .blocks import BlockRun, phase_of_call

logger = logging.getLogger("agentsd")


@dataclass(eq=False)
class DiTState:
    """What every patched block of one diffusion transformer needs to know about the current call.

    Attributes:
        config: The settings in force.
        base_model: ComfyUI's model (``ModelPatcher.model``), shared by its clones: its
            ``model_sampling`` is read at each call, so a sampling override set later is followed.
        patch_size: Latent pixels per token side (2 in SD3 and Flux).
        guidance_batch: Whether a call's batch holds guidance pairs (SD3; Flux is guidance-distilled),
            which random destinations need whole, as in the diffusers adapter.
        blocks: The patched blocks, in the order they run (double blocks, then single blocks).
        phase: The current call's phase, or ``None`` outside a model call.
        phase_index: Its index in the schedule.
        keys: The current call's random keys, one per patched block, or ``None`` for fixed destinations.
        grid: (h, w) of the current call's token grid.
        warned: Why blocks ran unmerged, each said once.
    """

    config: AgentSDConfig
    base_model: Any
    patch_size: int
    guidance_batch: bool
    blocks: list[DiTBlock] = field(default_factory=list)
    agents: AgentSettings = field(init=False)
    phase: Phase | None = None
    phase_index: int = 0
    keys: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    warned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.agents = AgentSettings.of(self.config)

    def __deepcopy__(self, memo: dict) -> DiTState:
        return self  # shared by the clones of a patched model, as its object patches are

    def wrapper(self, executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The ``APPLY_MODEL`` wrapper: ``args`` start with the latent and its sigmas."""
        self.start_call(args[0], args[1])
        try:
            return executor(*args, **kwargs)
        finally:
            self.phase, self.keys = None, None

    def start_call(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """This call's phase, token grid and random keys, from latent ``x`` [B, C, H, W] and its sigmas."""
        sampling = self.base_model.model_sampling
        timestep = sampling.timestep(sigma.flatten()[:1]).float().to(x.device)[0]  # what the model is given
        self.phase_index, self.phase = phase_of_call(self.config, sampling, timestep)
        self.grid = (math.ceil(x.shape[-2] / self.patch_size), math.ceil(x.shape[-1] / self.patch_size))
        use_rand = self.config.use_rand and (x.shape[0] % 2 == 0 or not self.guidance_batch)
        self.keys = draw_keys(self.config.seed, timestep, len(self.blocks)) if use_rand else None

    def unmerged_because(self, reason: str) -> None:
        """Say once, in the console, why blocks run unmerged."""
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning("agentsd: %s; those blocks run unmerged", reason)


@dataclass(eq=False)
class DiTBlock:
    """One patched block of a diffusion transformer and its merges in the current call.

    Attributes:
        model: The state shared by the model's patched blocks.
        index: Position in running order (part of its random key, as in the diffusers adapter).
        name: Its path in the diffusion model (``"joint_blocks.0"``, ``"single_blocks.3"``).
        single: Whether it is a Flux single-stream block (text and image in one sequence).
        previous_replace: The ``dit`` replacement the block had before AgentSD, if any: AgentSD's runs it.
        plan: This call's merge plan, while the block runs.
        text_tokens: This call's text tokens.
        agent_tokens: How many agent tokens ride after the merged tokens, or 0.
        previous_override: The attention override in the block's transformer options, if any: the
            ToMe phase calls it.
        last_run: What it did at its last call.
    """

    model: DiTState
    index: int
    name: str
    single: bool = False
    previous_replace: Callable[..., dict] | None = None
    plan: MergePlan | None = None
    text_tokens: int = 0
    agent_tokens: int = 0
    previous_override: Callable[..., torch.Tensor] | None = None
    last_run: BlockRun | None = None

    def __deepcopy__(self, memo: dict) -> DiTBlock:
        return self

    def __call__(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """The ``dit`` block replacement: the block on merged image tokens in this call's phase."""
        self.plan = self._plan(args)
        if self.plan is None:
            return self._run(args, extra)
        args = dict(args)
        options = dict(args.get("transformer_options") or {})
        self.previous_override = options.get("optimized_attention_override")
        options["optimized_attention_override"] = self.attend
        args["transformer_options"] = options
        if args.get("pe") is not None:
            args["pe"] = self._merged_rotary(args["pe"])
        try:
            return self._run(args, extra)
        finally:
            self.plan, self.agent_tokens, self.previous_override = None, 0, None

    def _run(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        if self.previous_replace is not None:
            return self.previous_replace(args, extra)
        return extra["original_block"](args)

    def _plan(self, args: dict[str, Any]) -> MergePlan | None:
        """This call's plan from the block's image-token input, or ``None`` (the block runs as it is)."""
        model = self.model
        tokens = args["img"]
        grid_tokens = model.grid[0] * model.grid[1]
        text = tokens.shape[1] - grid_tokens if self.single else 0
        reason = None
        if model.phase is None:
            reason = "the model was called outside ComfyUI's sampling (no sigma, so no phase)"
        elif args.get("attn_mask") is not None:
            reason = "an attention mask is set"
        elif text < 0 or tokens.shape[1] - text != grid_tokens:
            reason = f"the image tokens are not the latent's {model.grid[0]}x{model.grid[1]} grid (reference latents?)"
        if reason is not None:
            model.unmerged_because(reason)
            self.last_run = BlockRun(model.phase_index, merged=False, agents=False)
            return None
        image = tokens[:, text:]
        layout = make_layout(
            model.grid, model.phase, model.keys[self.index] if model.keys is not None else None, image.device
        )
        plan = make_plan(model.phase, layout, image)
        self.text_tokens = text if self.single else args["txt"].shape[1]
        self.agent_tokens = plan.agents.num_merged if plan is not None and plan.agents is not None else 0
        self.last_run = BlockRun(model.phase_index, merged=plan is not None, agents=self.agent_tokens > 0)
        return plan

    def merge_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N, C] as the attention projects them: merged, then the agent tokens."""
        plan = self.plan
        if plan is None or x.shape[1] != plan.num_tokens:
            return x
        merged = plan.merge(x)
        return torch.cat([merged, plan.agents.merge(x)], dim=1) if self.agent_tokens else merged

    def unmerge_rows(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output of the merged image tokens [B, M, C], back to all N tokens."""
        plan = self.plan
        if plan is None:
            return out
        if out.shape[1] != plan.tokens.num_merged:
            raise RuntimeError(
                f"AgentSD: block {self.name} returned {out.shape[1]} image rows where it merged "
                f"{plan.tokens.num_merged}; another node changes its attention's tokens"
            )
        return plan.unmerge(out)

    def _merged_rotary(self, pe: torch.Tensor) -> torch.Tensor:
        """Flux's rotary table [b, 1, T + N, ...] at the text tokens, the merged tokens' and the agents'
        representatives' positions (a single-stream block: padded with zeros to T + N rows)."""
        plan, text = self.plan, self.text_tokens
        batch = plan.tokens.dst_count.shape[0]
        rest = pe.shape[3:]
        image = pe[:, 0, text:].expand(batch, -1, *rest).reshape(batch * plan.num_tokens, -1)
        parts = [pe[:, :, :text].expand(batch, -1, -1, *rest)]
        for merge in (plan.tokens, plan.agents) if self.agent_tokens else (plan.tokens,):
            parts.append(image.index_select(0, merge.keep_rows).view(batch, 1, -1, *rest))
        if self.single:
            padding = plan.num_tokens - plan.tokens.num_merged - self.agent_tokens
            parts.append(pe.new_zeros(batch, 1, padding, *rest))
        return torch.cat(parts, dim=2)

    def attend(
        self,
        func: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The attention override of the block's calls: rows ``[text ; merged image ; agents]`` (a
        single-stream block's padded to all tokens), as ComfyUI orders its joint sequence."""
        plan = self.plan
        heads = args[0] if args else kwargs["heads"]
        per_head = kwargs.get("skip_reshape", False)
        rows = q.shape[2] if per_head else q.shape[1]
        merged, agents = plan.tokens.num_merged, self.agent_tokens
        text = self.text_tokens if self.single else rows - merged - agents  # SD3.5's attn2: no text
        valid = text + merged
        if agents:
            out = self._through_agents(q, k, v, heads, per_head, text, valid, kwargs.get("attn_precision"))
        else:
            q, k, v = (t[:, :, :valid] if per_head else t[:, :valid] for t in (q, k, v))
            if self.previous_override is not None:
                out = self.previous_override(func, q, k, v, *args, **kwargs)
            else:
                out = func(q, k, v, *args, **kwargs)
            if kwargs.get("skip_output_reshape"):
                out = out.transpose(1, 2).flatten(2)
        if self.single:
            out = torch.cat([out[:, :text], plan.unmerge(out[:, text:])], dim=1)
        return out.unflatten(-1, (heads, -1)).transpose(1, 2) if kwargs.get("skip_output_reshape") else out

    def _through_agents(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        per_head: bool,
        text: int,
        valid: int,
        precision: Any,
    ) -> torch.Tensor:
        """[B, text + M, C]: image rows through the agents, text rows exact
        (:func:`agentsd.attention.joint_attention`)."""
        if not per_head:  # [B, rows, C], or [B, rows, heads, d] (SD3's values)
            q, k, v = (t.reshape(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v))
        settings = self.model.agents
        settings = settings._replace(upcast=settings.upcast or precision == torch.float32)
        image = Stream(q[:, :, text:valid], k[:, :, text:valid], v[:, :, text:valid])
        agents = q[:, :, valid : valid + self.agent_tokens]
        if text:
            context = Stream(q[:, :, :text], k[:, :, :text], v[:, :, :text])
            image_rows, text_rows = joint_attention(image, context, True, agents, settings)
            out = torch.cat([text_rows, image_rows], dim=2)
        else:
            out = agent_attention(image.q, image.k, image.v, agents, *settings)
        return out.transpose(1, 2).flatten(2)


class MergesInput:
    """Mixed into a twin of an image stream's query-key-value projection: it projects the merged
    tokens (and the agents) of its block's plan."""

    agentsd_block: DiTBlock

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(self.agentsd_block.merge_rows(x), *args, **kwargs)


class UnmergesOutput:
    """Mixed into a twin of an image stream's attention output projection: it projects the merged
    tokens, then unmerges them."""

    agentsd_block: DiTBlock

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.agentsd_block.unmerge_rows(super().forward(x, *args, **kwargs))


class SplitsProjection:
    """Mixed into a twin of a Flux single-stream block's ``linear1`` (queries, keys, values, then the
    MLP input, in one layer): the first ``3 * hidden_size`` outputs for the text and merged tokens
    (and the agents), zero rows after them; the MLP's for every token."""

    agentsd_block: DiTBlock
    agentsd_split: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.agentsd_block
        if block.plan is None:
            return super().forward(x)
        text = block.text_tokens
        rows = torch.cat([x[:, :text], block.merge_rows(x[:, text:])], dim=1)
        split = self.agentsd_split
        if type(self.weight) in (torch.Tensor, torch.nn.Parameter):
            weight, bias, done = self._weights(x)
            mlp = F.linear(x, weight[split:], None if bias is None else bias[split:])
            qkv = F.linear(rows, weight[:split], None if bias is None else bias[:split])
            done()
        else:  # weights of a kind only the layer's own forward reads (quantised formats): all of it, twice
            both = super().forward(torch.cat([x, rows], dim=1))
            mlp, qkv = both[:, : x.shape[1], split:], both[:, x.shape[1] :, :split]
        out = mlp.new_zeros(*x.shape[:2], split + mlp.shape[-1])
        out[..., split:] = mlp
        out[:, : rows.shape[1], :split] = qkv
        return out

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[], None]]:
        """The layer's weight and bias as its forward would use them (ComfyUI's cast and weight
        functions, LoRA in low-VRAM mode), and what to call when done with them."""
        if not isinstance(self, comfy.ops.CastWeightBiasOp):
            return self.weight, self.bias, lambda: None
        weight, bias, stream = comfy.ops.cast_bias_weight(self, x, offloadable=True)
        return weight, bias, lambda: comfy.ops.uncast_bias_weight(self, weight, bias, stream)
