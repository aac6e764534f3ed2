"""Diffusers' ``Attention`` and ``FeedForward`` layers run on a block's merged tokens.

The patch replaces no attention processor: each stage calls the layer's own processor (SDPA,
xformers, fused QKV, IP-Adapter, Custom Diffusion, PAG, a user's) on the merged tokens, so whatever
the user set up keeps running. Agent attention does its own math, with the layer's projections,
only where it can stand in for the processor without changing what the processor means: plain
self-attention (no encoder states, no mask) through a processor known to compute plain softmax
attention (:data:`PLAIN_SOFTMAX_PROCESSORS`). Any other processor is called as it is, and the
block runs ToMe there; the summary names the processor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import diffusers.models.attention_processor as processors
import torch

from .. import attention
from ..attention import AgentSettings
from ..block import run_merged
from ..merge import MergePlan

#: Processors that compute ``softmax(q k^T / sqrt(d)) v`` and nothing else when called without
#: encoder states: agent attention may replace their computation in plain self-attention. Exact
#: types: a subclass may do more.
PLAIN_SOFTMAX_PROCESSORS = tuple(
    getattr(processors, name)
    for name in (
        "AttnProcessor",
        "AttnProcessor2_0",
        "AttnProcessorNPU",
        "FusedAttnProcessor2_0",
        "SlicedAttnProcessor",
        "XFormersAttnProcessor",
        "XLAFlashAttnProcessor2_0",
        "JointAttnProcessor2_0",  # SD3.5's second attention: plain self-attention, no text stream
    )
    if hasattr(processors, name)
)


def runs_plain_softmax(attn: Any) -> bool:
    """Whether layer ``attn``'s processor is one that agent attention may stand in for."""
    return type(attn.processor) in PLAIN_SOFTMAX_PROCESSORS


def split_heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def layer_queries(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """Layer ``attn``'s per-head queries [B, heads, N, d] of tokens ``x`` [B, N, C] (``to_q``, then ``norm_q``)."""
    q = split_heads(attn, attn.to_q(x))
    return q if attn.norm_q is None else attn.norm_q(q)


def layer_keys_values(attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``attn``'s per-head keys (``to_k``, then ``norm_k``) and values of tokens ``context``."""
    k = split_heads(attn, attn.to_k(context))
    return (k if attn.norm_k is None else attn.norm_k(k)), split_heads(attn, attn.to_v(context))


def layer_output(attn: Any, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Layer ``attn``'s output for per-head attention ``out`` [B, heads, N, d] of its input ``x`` [B, N, C].

    ``to_out``, then the residual and rescaling that diffusers' processors apply.
    """
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def agent_self_attention(attn: Any, x: torch.Tensor, agent_tokens: torch.Tensor, agents: AgentSettings) -> torch.Tensor:
    """Self-attention of layer ``attn`` for tokens ``x`` [B, M, C] through ``agent_tokens`` [B, A, C].

    The projections, the optional q/k norms and ``to_out`` are the layer's own; the agents'
    queries are the layer's queries of the agent tokens.
    """
    q, agent_queries = layer_queries(attn, x), layer_queries(attn, agent_tokens)
    k, v = layer_keys_values(attn, x)
    out = attention.agent_attention(q, k, v, agent_queries, agents.k_scale2, agents.k_shortcut, upcast=agents.upcast)
    return layer_output(attn, out, x)


def accepted_keywords(processor: Any) -> frozenset[str]:
    """The keyword arguments ``processor`` accepts (``Attention.forward`` passes only those)."""
    return frozenset(inspect.signature(processor.__call__).parameters)


def processor_kwargs(given: dict[str, Any], accepted: frozenset[str]) -> tuple[dict[str, Any], bool]:
    """The keywords an attention layer's processor is called with, and whether the call is plain
    self-attention (no ``encoder_hidden_states``, no mask: the only calls agents may serve).

    Args:
        given: The call's keywords, positional ``encoder_hidden_states`` and ``attention_mask`` named.
        accepted: What the processor accepts (:func:`accepted_keywords`).
    """
    call_kwargs = {
        name: value
        for name, value in given.items()
        if name in accepted or name in ("encoder_hidden_states", "attention_mask")
    }
    plain = given.get("encoder_hidden_states") is None and given.get("attention_mask") is None
    return call_kwargs, plain


class StageCall(NamedTuple):
    """One call of a merging stage: the module, which stage it is, and how its own forward is called.

    Plain values (a module, strings, tuples, tensors, ``None``), not a closure, so that a traced call
    can be an argument of :data:`agentsd.block.stage_in_region`, which dynamo traces once for the
    blocks of a level. (A module whose ``forward`` another library had replaced carries that
    function in ``previous``, which dynamo cannot match between blocks: its blocks are then traced
    one by one.)

    Attributes:
        module: The attention layer or feed-forward (or, in Flux's single-stream blocks, the MLP
            branch's projection).
        stage: Which part of the block it is (its attribute name).
        previous: The module's instance ``forward`` from before the patch (another library's), or ``None``.
        args: Positional arguments of the module's forward besides the tokens.
        kwargs: Its keyword arguments; for an attention layer, those its processor accepts.
        agents: Agent attention's settings where agents may stand in for the processor (plain
            self-attention in ``attn1`` through a plain-softmax processor), else ``None``.
        feed_forward: Whether the module is a per-token layer (``ff``), not an attention layer.
    """

    module: torch.nn.Module
    stage: str
    previous: Callable[..., Any] | None
    args: tuple
    kwargs: dict[str, Any]
    agents: AgentSettings | None
    feed_forward: bool = False

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        """The module's own forward on tokens ``x``: its processor for an attention layer, as
        ``Attention.forward`` calls it."""
        if self.previous is not None:
            return self.previous(x, *self.args, **self.kwargs)
        if self.feed_forward:
            return type(self.module).forward(self.module, x, *self.args, **self.kwargs)
        return self.module.processor(self.module, x, *self.args, **self.kwargs)

    def agent_layer(self, x: torch.Tensor, agent_tokens: torch.Tensor) -> torch.Tensor:
        return agent_self_attention(self.module, x, agent_tokens, self.agents)

    def runner_name(self, merged: bool) -> str:
        """What ran the call, for the summary: the module's class, or an attention layer's processor's."""
        if self.previous is not None:
            return "replaced forward"
        return type(self.module if self.feed_forward else self.module.processor).__name__

    def fits(self, plan: MergePlan | None, x: torch.Tensor) -> bool:
        """Whether this call runs on ``plan``'s merged tokens: ``x`` holds the tokens the plan was made
        for (a per-token layer: after text tokens, as in Flux's single-stream blocks)."""
        if plan is None:
            return False
        return x.shape[1] == plan.num_tokens or (self.feed_forward and x.shape[1] > plan.num_tokens)

    def output(self, plan: MergePlan | None, x: torch.Tensor) -> torch.Tensor:
        """The module's output for tokens ``x`` [B, N, C], computed on ``plan``'s merged tokens.

        Without a plan, or for a call whose token count does not fit it (a feed-forward chunked along
        the tokens by ``set_chunk_feed_forward(dim=1)``), the module runs on ``x`` itself. A per-token
        layer called on text tokens followed by the image tokens runs on the text tokens and the
        merged image tokens.
        """
        if not self.fits(plan, x):
            return self.layer(x)
        text = x.shape[1] - plan.num_tokens
        if text:
            out = self.layer(torch.cat([x[:, :text], plan.merge(x[:, text:])], dim=1))
            return torch.cat([out[:, :text], plan.unmerge(out[:, text:])], dim=1)
        return run_merged(plan, x, self.layer, self.agent_layer if self.agents is not None else None)
