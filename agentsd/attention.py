"""Agent attention: the math, on per-head tensors, for any engine.

Agent attention (Han et al., ECCV 2024) lets a few agent tokens ``a`` stand between the queries
and the keys: the agents first gather from every token, then every query reads from the agents,

    agent_feature = softmax(a k^T * s) v
    out           = softmax(q a^T * s ** k_scale2) agent_feature + k_shortcut * v,   s = head_dim ** -0.5

which costs O(N * M) for M agents instead of O(N^2). Both products are ordinary softmax attention,
so each runs on ``F.scaled_dot_product_attention`` with an explicit ``scale`` and neither attention
matrix is materialised.

An engine adapter computes the projections with its own layers and calls :func:`agent_attention`
(the diffusers adapter: ``agentsd.diffusers_patch.layers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import AgentSDConfig


class AgentSettings(NamedTuple):
    """The settings of agent attention, from an :class:`~agentsd.AgentSDConfig`.

    A tuple of numbers rather than the configuration object, so that a traced stage can take it as
    plain constants (see :func:`agentsd.block.stage_by_noise_level`).
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
