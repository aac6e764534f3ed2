"""Agent attention and the diffusers attention processors that apply a block's merge plan.

Agent attention (Han et al., ECCV 2024) lets a few agent tokens ``a`` stand between the queries
and the keys: the agents first gather from every token, then every query reads from the agents,

    agent_feature = softmax(a k^T * s) v
    out           = softmax(q a^T * s ** k_scale2) agent_feature + k_shortcut * v,   s = head_dim ** -0.5

which costs O(N * M) for M agents instead of O(N^2). Both products are ordinary softmax attention,
so each runs on ``F.scaled_dot_product_attention`` with an explicit ``scale`` and neither attention
matrix is materialised.

The processors wrap whatever processor the layer had (``inner``): when a block has no merge plan
they call it unchanged, and plain ToMe calls it on the merged tokens, so the layer's own attention
backend (SDPA, xformers, a user's processor) keeps doing the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .merge import MergePlan
    from .patch import BlockState

AttentionProcessor = Callable[..., torch.Tensor]


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


class TokenMergeProcessor:
    """Plain ToMe around any processor: merge the queries, run ``inner``, unmerge.

    Used on ``attn2`` with ``merge_crossattn``, and the base of :class:`AgentSDAttnProcessor`.
    Without a plan for the current call (block outside ``max_downsample``, ratio 0) it is exactly
    ``inner``.
    """

    #: Which part of the block this processor serves (see ``BlockState.take_plan``).
    stage = "attn2"

    def __init__(self, block: BlockState | None = None, inner: AttentionProcessor | None = None) -> None:
        """Wrap ``inner`` (default: diffusers' SDPA processor) for the patched ``block``.

        Both are optional because diffusers' loaders rebuild processors as ``type(processor)()``
        (``load_ip_adapter`` does so for every ``attn1``): such a detached copy is exactly ``inner``
        until the patch adopts it at the next UNet call.
        """
        self.block = block
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plan = self.block.take_plan(self.stage) if self.block is not None else None
        if plan is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return plan.unmerge(self.attend(attn, hidden_states, plan, encoder_hidden_states, attention_mask, **kwargs))

    def attend(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        plan: MergePlan,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention output for the merged tokens of ``hidden_states`` (unmerged by the caller)."""
        return self.inner(attn, plan.merge(hidden_states), encoder_hidden_states, attention_mask, **kwargs)


class AgentSDAttnProcessor(TokenMergeProcessor):
    """Self-attention (``attn1``) processor: merged tokens attend through agents when the plan has them.

    ``hidden_states`` arrives normalised (``norm1(x)``); the block's plan was made from the raw
    block input ``x`` by the block hook. Merged tokens and agents both come from the normalised
    states, as in the reference. A plan without agents, or a call with a mask or with
    ``encoder_hidden_states`` (not plain self-attention), is plain ToMe around ``inner``.
    """

    stage = "attn1"

    def attend(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        plan: MergePlan,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if plan.agents is None or encoder_hidden_states is not None or attention_mask is not None:
            return super().attend(attn, hidden_states, plan, encoder_hidden_states, attention_mask, **kwargs)
        x, agent_tokens = plan.merge(hidden_states), plan.agents.merge(hidden_states)
        q, k, v, a = (_heads(attn, t) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.to_q(agent_tokens)))
        if attn.norm_q is not None:
            q, a = attn.norm_q(q), attn.norm_q(a)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        config = self.block.config
        out = agent_attention(q, k, v, a, config.k_scale2, config.k_shortcut, upcast=config.attn_precision == "fp32")
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        if attn.residual_connection:
            out = out + x
        return out / attn.rescale_output_factor
