"""Agent attention: the math, on per-head tensors, for any engine.

Agent attention (Han et al., ECCV 2024) lets a few agent tokens ``a`` stand between the queries
and the keys: the agents first gather from every token, then every query reads from the agents,

    agent_feature = softmax(a k^T * s) v
    out           = softmax(q a^T * s ** k_scale2) agent_feature + k_shortcut * v,   s = head_dim ** -0.5

which costs O(N * M) for M agents instead of O(N^2). Both products are ordinary softmax attention,
so each runs on ``F.scaled_dot_product_attention`` with an explicit ``scale`` and neither attention
matrix is materialised.

A diffusion transformer's joint attention (SD3, Flux) attends from image and text queries over the
keys and values of both; :func:`joint_attention` runs its image rows through the agents and keeps
its few text rows exact, as the text stream reads them.

An engine adapter computes the projections with its own layers and calls :func:`agent_attention` or
:func:`joint_attention` (the diffusers adapter: ``agentsd.diffusers_patch.layers`` and ``joint_layers``).
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
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Agent attention on per-head tensors.

    Args:
        q, k, v: [B, heads, N, head_dim] queries, keys and values of the (merged) tokens.
        agents: [B, heads, M, head_dim] agent queries (``to_q`` of the agent tokens).
        k_scale2: Exponent of the second softmax's scale, ``s ** k_scale2``.
        k_shortcut: Weight of the value shortcut.
        upcast: Compute in float32 and cast back (``attn_precision="fp32"``).
        shortcut: The values added to the queries' rows, [B, heads, N, head_dim]; ``None`` for ``v``
            (self-attention, where queries and keys are the same tokens).

    Returns:
        [B, heads, N, head_dim].
    """
    dtype = q.dtype
    shortcut = v if shortcut is None else shortcut
    if upcast:
        q, k, v, agents, shortcut = q.float(), k.float(), v.float(), agents.float(), shortcut.float()
    scale = q.shape[-1] ** -0.5
    agent_feature = F.scaled_dot_product_attention(agents, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_feature, scale=scale**k_scale2)
    return (out + k_shortcut * shortcut).to(dtype)


class Stream(NamedTuple):
    """One stream's per-head queries, keys and values in a joint attention: [B, heads, tokens, head_dim] each."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def joint_attention(
    image: Stream,
    text: Stream,
    text_first: bool,
    agents: torch.Tensor | None = None,
    settings: AgentSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of an image and a text stream over the keys and values of both.

    Args:
        image: The image tokens' queries, keys and values (merged tokens, on a merged block).
        text: The text tokens'.
        text_first: The model's order of the joint sequence: ``[text ; image]`` (Flux) or
            ``[image ; text]`` (SD3). It orders the keys and values, as the model does.
        agents: [B, heads, A, head_dim] agent queries, or ``None`` for ordinary attention.
        settings: Agent attention's settings (required with ``agents``).

    Returns:
        (image rows, text rows), [B, heads, tokens, head_dim] each. With agents the image rows are
        agent attention over the joint keys and values, its shortcut the image values; the text
        rows are always exact softmax attention.
    """
    parts = (text, image) if text_first else (image, text)
    k = torch.cat([part.k for part in parts], dim=2)
    v = torch.cat([part.v for part in parts], dim=2)
    if agents is None:
        q = torch.cat([part.q for part in parts], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        first, second = out.split([parts[0].q.shape[2], parts[1].q.shape[2]], dim=2)
        return (second, first) if text_first else (first, second)
    image_rows = agent_attention(
        image.q, k, v, agents, settings.k_scale2, settings.k_shortcut, settings.upcast, shortcut=image.v
    )
    return image_rows, F.scaled_dot_product_attention(text.q, k, v)
