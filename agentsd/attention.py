"""Agent attention, and an attention layer run on a block's merged tokens.

Agent attention (Han et al., ECCV 2024) lets a few agent tokens ``a`` stand between the queries
and the keys: the agents first gather from every token, then every query reads from the agents,

    agent_feature = softmax(a k^T * s) v
    out           = softmax(q a^T * s ** k_scale2) agent_feature + k_shortcut * v,   s = head_dim ** -0.5

which costs O(N * M) for M agents instead of O(N^2). Both products are ordinary softmax attention,
so each runs on ``F.scaled_dot_product_attention`` with an explicit ``scale`` and neither attention
matrix is materialised.

AgentSD replaces no attention processor. The patch hooks the ``Attention`` modules themselves
(``agentsd.patch``), and :func:`attend_merged` calls the layer's own forward, and so whatever
processor it has (SDPA, xformers, fused QKV, IP-Adapter, Custom Diffusion, a user's), on the merged
tokens. Only agent attention does its own math, with the layer's projections, and only in plain
self-attention through a processor that holds no weights of its own: a processor that does
(Custom Diffusion's, say) is always the one called, so its weights keep taking part.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .config import AgentSDConfig
    from .merge import MergePlan


class AgentSettings(NamedTuple):
    """The settings of agent attention, from an :class:`~agentsd.AgentSDConfig`.

    A tuple of numbers rather than the configuration object, so that a traced stage can take it as
    plain constants (see ``agentsd.patch.StageCall``).
    """

    k_scale2: float
    k_shortcut: float
    upcast: bool

    @classmethod
    def of(cls, config: AgentSDConfig) -> AgentSettings:
        return cls(config.k_scale2, config.k_shortcut, config.attn_precision == "fp32")


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    upcast: bool = False,
) -> torch.Tensor:
    """Agent attention on per-head tensors.

    Args:
        q, k, v: [B, heads, N, head_dim] queries, keys and values of the (merged) tokens.
        agents: [B, heads, M, head_dim] agent queries (``to_q`` of the agent tokens).
        k_scale2: Exponent of the second softmax's scale, ``s ** k_scale2``.
        k_shortcut: Weight of the value shortcut.
        upcast: Compute in float32 and cast back (``attn_precision="fp32"``).

    Returns:
        [B, heads, N, head_dim].
    """
    dtype = q.dtype
    if upcast:
        q, k, v, agents = q.float(), k.float(), v.float(), agents.float()
    scale = q.shape[-1] ** -0.5
    agent_feature = F.scaled_dot_product_attention(agents, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_feature, scale=scale**k_scale2)
    return (out + k_shortcut * v).to(dtype)


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def layer_queries(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Layer ``attn``'s per-head queries [B, heads, N, d] of tokens ``x`` [B, N, C] (``to_q``, then ``norm_q``)."""
    q = _heads(attn, attn.to_q(x))
    return q if attn.norm_q is None else attn.norm_q(q)


def layer_keys_values(attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``attn``'s per-head keys (``to_k``, then ``norm_k``) and values of tokens ``context``."""
    k = _heads(attn, attn.to_k(context))
    return (k if attn.norm_k is None else attn.norm_k(k)), _heads(attn, attn.to_v(context))


def layer_output(attn: Attention, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Layer ``attn``'s output for per-head attention ``out`` [B, heads, N, d] of its input ``x`` [B, N, C].

    ``to_out``, then the residual and rescaling that diffusers' processors apply.
    """
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def holds_weights(processor: object) -> bool:
    """Whether an attention processor has parameters of its own (Custom Diffusion's, IP-Adapter's)."""
    return isinstance(processor, torch.nn.Module) and next(processor.parameters(), None) is not None


def agent_self_attention(
    attn: Attention, x: torch.Tensor, agent_tokens: torch.Tensor, agents: AgentSettings
) -> torch.Tensor:
    """Self-attention of layer ``attn`` for tokens ``x`` [B, M, C] through ``agent_tokens`` [B, A, C].

    The projections, the optional q/k norms and ``to_out`` are the layer's own; the agents'
    queries are the layer's queries of the agent tokens.
    """
    q, agent_queries = layer_queries(attn, x), layer_queries(attn, agent_tokens)
    k, v = layer_keys_values(attn, x)
    out = agent_attention(q, k, v, agent_queries, agents.k_scale2, agents.k_shortcut, upcast=agents.upcast)
    return layer_output(attn, out, x)


def processor_kwargs(attn: Attention, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The keywords that layer ``attn``'s processor is called with for a call ``attn(x, *args, **kwargs)``,
    and whether that call is plain self-attention.

    As in ``Attention.forward``: the keywords the processor accepts. Its ``inspect.signature`` is taken
    here, outside any traced branch, because dynamo cannot build a ``Signature`` inside a ``torch.cond``
    branch, where a traced call runs the layer. Plain self-attention means no ``encoder_hidden_states``
    and no mask: the only calls agents may serve.
    """
    given = dict(zip(("encoder_hidden_states", "attention_mask"), args)) | kwargs
    accepted = inspect.signature(attn.processor.__call__).parameters
    call_kwargs = {
        name: value
        for name, value in given.items()
        if name in accepted or name in ("encoder_hidden_states", "attention_mask")
    }
    plain = given.get("encoder_hidden_states") is None and given.get("attention_mask") is None
    return call_kwargs, plain


def attend_merged(
    attn: Attention,
    hidden_states: torch.Tensor,
    plan: MergePlan,
    layer: Callable[[torch.Tensor], torch.Tensor],
    agents: AgentSettings | None,
) -> torch.Tensor:
    """Layer ``attn``'s output for ``hidden_states`` [B, N, C], computed on ``plan``'s merged tokens.

    ``layer(x)`` is the layer's own forward. Where agents are wanted (``agents`` given: plain
    self-attention in ``attn1``), the plan has them, and the layer's processor holds no weights, the
    merged tokens attend through the agents; otherwise ``layer`` runs on the merged tokens (plain
    ToMe). Either way the result is unmerged back to N tokens.

    ``hidden_states`` arrives normalised (``norm1(x)``) while the plan was made from the raw block
    input ``x``: merged tokens and agents both come from the normalised states, as in the reference.
    """
    merged = plan.merge(hidden_states)
    if agents is not None and plan.agents is not None and not holds_weights(attn.processor):
        out = agent_self_attention(attn, merged, plan.agents.merge(hidden_states), agents)
    else:
        out = layer(merged)
    return plan.unmerge(out)
