"""Rotary position embeddings at the merged tokens' positions, for any engine.

A model with rotary embeddings (Flux) rotates each query and key by the angle of its token's
position. A merged token stands at the position of the token that represents it in the merge
(:meth:`agentsd.merge.TokenMerge.positions`), so its rotation is the model's table read there, one
row per merged token and sample; text tokens keep their own rows. Agents are rotated likewise, at
their representatives' positions.
"""

from __future__ import annotations

import torch


def rows_at(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of a rotary table [N, D] (the image grid's, row-major) at ``positions`` [B, M]: [B, M, D]."""
    return table.index_select(0, positions.flatten()).view(*positions.shape, table.shape[-1])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate per-head tokens ``x`` [B, heads, S, D] by angles ``cos``, ``sin`` [B or 1, S, D].

    Pairs of adjacent channels are rotated as complex numbers (Flux's layout: the table repeats each
    frequency for the two channels of a pair), computed in float32 and cast back, as the model does.
    """
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
