"""Diffusers' joint attention layers (SD3 / SD3.5, Flux) run on a block's merged image tokens.

In an MMDiT block the image and text tokens attend jointly: each stream has its own projections,
and the keys and values of both are concatenated in the model's order (``[image ; text]`` in SD3,
``[text ; image]`` in Flux). Only image tokens merge; text tokens are never merged and keep their
own exact attention rows, since the text stream reads them. Flux's single-stream blocks call the
layer on one sequence, text first: its image part merges.

Through a processor known to compute the model's plain joint attention (:data:`JOINT_PROCESSORS`),
the agent phase runs here with the layer's own projections and norms
(:func:`agentsd.attention.joint_attention`): image rows through the agents, text rows exact. In the
ToMe phase a model without rotary embeddings (SD3) calls its own processor, whatever it is, on the
merged image tokens. Flux rotates queries and keys by position: merged tokens take their
representatives' positions (:mod:`agentsd.rotary`), which only the computation here can do, so a
Flux layer with another processor (IP-Adapter, ...) runs unmerged, and the summary says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import rotary
from ..attention import AgentSettings, Stream, joint_attention
from ..merge import MergePlan, TokenMerge
from .layers import layer_queries, split_heads


def _processor_types(module: Any, *names: str) -> tuple[type, ...]:
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


@functools.cache
def joint_processors() -> tuple[type, ...]:
    """Processors that compute exactly the model's joint softmax attention (exact types: a subclass
    may do more). Read when first needed, so that importing agentsd imports no model module."""
    import diffusers.models.attention_processor as processors
    import diffusers.models.transformers.transformer_flux as flux

    return _processor_types(processors, "JointAttnProcessor2_0", "FluxAttnProcessor2_0") + _processor_types(
        flux, "FluxAttnProcessor"
    )


def _project(attn: Any, x: torch.Tensor, added: bool) -> Stream:
    """Per-head queries, keys and values of tokens ``x`` through the image (or, ``added``, the text)
    projections of layer ``attn``, with its per-head norms."""
    if added:
        layers = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
    else:
        layers = (attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    to_q, to_k, to_v, norm_q, norm_k = layers
    q, k = split_heads(attn, to_q(x)), split_heads(attn, to_k(x))
    return Stream(q if norm_q is None else norm_q(q), k if norm_k is None else norm_k(k), split_heads(attn, to_v(x)))


def _rotated(stream: Stream, cos: torch.Tensor, sin: torch.Tensor) -> Stream:
    """A stream with its queries and keys rotated (values are not)."""
    return Stream(rotary.rotate(stream.q, cos, sin), rotary.rotate(stream.k, cos, sin), stream.v)


class Rotary(NamedTuple):
    """The rotary table of a call split at the text tokens: (cos, sin) of the text rows [1, T, D] and
    of the image grid [N, D]."""

    text: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, table: tuple[torch.Tensor, torch.Tensor], text_tokens: int) -> Rotary:
        cos, sin = table
        return cls(
            (cos[:text_tokens].unsqueeze(0), sin[:text_tokens].unsqueeze(0)), (cos[text_tokens:], sin[text_tokens:])
        )

    def at(self, merge: TokenMerge) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, M, D] of the merged tokens of ``merge``, at their representatives' positions."""
        positions = merge.positions()
        return rotary.rows_at(self.grid[0], positions), rotary.rows_at(self.grid[1], positions)


def _flat(out: torch.Tensor) -> torch.Tensor:
    """[B, heads, S, d] -> [B, S, heads * d]."""
    return out.transpose(1, 2).flatten(2)


class JointCall(NamedTuple):
    """One call of a joint attention layer: the module, how its own forward is called, and how the
    model lays out its joint sequence.

    Plain values, as :class:`~agentsd.diffusers_patch.layers.StageCall`, so that a traced call can be
    an argument of a compile region.

    Attributes:
        module: The attention layer (``Attention`` in SD3, ``FluxAttention`` in Flux).
        stage: Its attribute name in the block (``"attn"``).
        previous: The module's instance ``forward`` from before the patch (another library's), or ``None``.
        args: Positional arguments of its forward besides the tokens.
        kwargs: Its keyword arguments (``encoder_hidden_states``, ``image_rotary_emb``, ...): with the
            module's own forward, those its processor accepts.
        text_first: Whether the joint sequence is ``[text ; image]`` (Flux) rather than ``[image ; text]``.
        own: Whether the processor is one of :func:`joint_processors`: the math here may replace it.
        agents: Agent attention's settings where agents may stand in (``own``), else ``None``.
    """

    module: torch.nn.Module
    stage: str
    previous: Callable[..., Any] | None
    args: tuple
    kwargs: dict[str, Any]
    text_first: bool
    own: bool
    agents: AgentSettings | None

    def context(self) -> torch.Tensor | None:
        """The text stream's tokens, when the layer takes them apart (``None`` in a single-stream block)."""
        return self.args[0] if self.args else self.kwargs.get("encoder_hidden_states")

    def rotary_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.args[2] if len(self.args) > 2 else self.kwargs.get("image_rotary_emb")

    def layer(self, x: torch.Tensor) -> Any:
        """The module's own forward on tokens ``x``: its processor, called as the module calls it
        (``kwargs`` hold only what the processor accepts)."""
        if self.previous is not None:
            return self.previous(x, *self.args, **self.kwargs)
        return self.module.processor(self.module, x, *self.args, **self.kwargs)

    def runner_name(self, merged: bool) -> str:
        """What ran the call, for the summary: the layer's processor, or agentsd's joint attention where
        a rotary model ran on merged tokens (its processor cannot take the merged positions)."""
        if self.previous is not None:
            return "replaced forward"
        name = type(self.module.processor).__name__
        return f"agentsd's joint attention (for {name})" if merged and self.rotary_table() is not None else name

    def fits(self, plan: MergePlan | None, x: torch.Tensor) -> bool:
        """Whether this call runs on ``plan``'s merged tokens: the image tokens fit the plan, and a
        rotary model's processor is one whose math runs here."""
        if plan is None:
            return False
        text_tokens = 0 if self.context() is not None else x.shape[1] - plan.num_tokens
        return (
            text_tokens >= 0
            and x.shape[1] - text_tokens == plan.num_tokens
            and (self.own or self.rotary_table() is None)
        )

    def output(self, plan: MergePlan | None, x: torch.Tensor) -> Any:
        """The layer's output for ``x`` (the image tokens, or a single-stream block's text and image
        tokens), computed on ``plan``'s merged image tokens where :meth:`fits`, else on ``x``."""
        if not self.fits(plan, x):
            return self.layer(x)
        context = self.context()
        text_tokens = 0 if context is not None else x.shape[1] - plan.num_tokens
        text, image = x[:, :text_tokens], x[:, text_tokens:]
        merged = plan.merge(image)
        with_agents = self.agents is not None and plan.agents is not None
        if not with_agents and self.rotary_table() is None:  # ToMe through the layer's own processor
            if context is None:
                out = self.layer(torch.cat([text, merged], dim=1))
                return torch.cat([out[:, :text_tokens], plan.unmerge(out[:, text_tokens:])], dim=1)
            image_out, *rest = self.layer(merged)
            # Contiguous, as the agents' branch: a traced call's branches must give alike laid-out outputs.
            return (plan.unmerge(image_out), *(out.contiguous() for out in rest))
        image_out, text_out = self._attend(plan, image, merged, text if context is None else context)
        if context is None:  # a single-stream block's layer has no output projection
            return torch.cat([text_out, plan.unmerge(image_out)], dim=1)
        attn = self.module
        image_out = plan.unmerge(attn.to_out[1](attn.to_out[0](image_out)))
        return image_out, text_out.contiguous() if attn.context_pre_only else attn.to_add_out(text_out)

    def _attend(
        self, plan: MergePlan, image: torch.Tensor, merged: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of the merged image tokens and the text tokens: [B, M, C], [B, T, C]."""
        attn = self.module
        added = self.context() is not None
        image_stream, text_stream = _project(attn, merged, False), _project(attn, text, added)
        agent_queries = layer_queries(attn, plan.agents.merge(image)) if self.agents and plan.agents else None
        table = self.rotary_table()
        if table is not None:
            rope = Rotary.of(table, text.shape[1])
            image_stream = _rotated(image_stream, *rope.at(plan.tokens))
            text_stream = _rotated(text_stream, *rope.text)
            if agent_queries is not None:
                agent_queries = rotary.rotate(agent_queries, *rope.at(plan.agents))
        image_rows, text_rows = joint_attention(image_stream, text_stream, self.text_first, agent_queries, self.agents)
        return _flat(image_rows).to(merged.dtype), _flat(text_rows).to(merged.dtype)
