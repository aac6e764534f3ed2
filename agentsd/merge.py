"""Token merging by bipartite soft matching on a 2-D token grid (ToMe for Stable Diffusion).

A block's N tokens are split into destinations (one per ``sx``-by-``sy`` cell of the grid) and
sources (every other token). Each source is scored by its best cosine similarity to any
destination; the ``r`` best-matched sources are averaged into their destinations and the rest are
kept. AgentSD makes a second, stronger cut of the *same* ranking: its ``agent_r`` best sources are
merged away too, and what is left are the agent tokens.

A merge is stored as index tensors (:class:`TokenMerge`), not as closures, so that merging and
unmerging are each a couple of gathers, the plan can be inspected in tests, and unmerging is a
single ``gather``: every original token reads the merged token it went into.

Every gather here indexes a feature dimension of size > 1, which keeps clear of the MPS bug that
``tomesd`` works around (``torch.gather`` on MPS with a last dimension of 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Sources are scored against destinations in row blocks of this many tokens, so that the full
#: [B, N_src, N_dst] similarity matrix (400 MB at 16k tokens) never exists at once.
SCORE_BLOCK = 1024


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i], :]`` for a [B, N, C] tensor and a [B, M] index."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class TokenMerge:
    """One bipartite merge of N tokens into N - r, and its inverse.

    The merged sequence is ``[kept sources..., destinations...]``.

    Attributes:
        keep_idx: [B, N - r] position, among the N input tokens, of each merged-sequence token.
        src_idx: [B, r] positions of the sources that are averaged away.
        dst_slot: [B, r] slot in the merged sequence of each such source's destination.
    """

    keep_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_slot: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """N, the length of the unmerged sequence."""
        return self.keep_idx.shape[1] + self.src_idx.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: destinations become the mean of themselves and their sources."""
        kept = _gather_tokens(x, self.keep_idx)
        if self.src_idx.shape[1] == 0:
            return kept
        index = self.dst_slot.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return kept.scatter_reduce(1, index, _gather_tokens(x, self.src_idx), reduce="mean", include_self=True)

    def unmerge_index(self) -> torch.Tensor:
        """[B, N]: the merged-sequence slot that each original token takes its value from."""
        batch, kept = self.keep_idx.shape
        slots = torch.empty(batch, self.num_tokens, dtype=torch.long, device=self.keep_idx.device)
        slots.scatter_(1, self.keep_idx, torch.arange(kept, device=slots.device).expand(batch, -1))
        slots.scatter_(1, self.src_idx, self.dst_slot)
        return slots


@dataclass(frozen=True)
class MergePlan:
    """The merges of one block call: tokens for attention, and (optionally) the agents.

    Attributes:
        tokens: Merges the block's N tokens into N - r.
        agents: Merges the same tokens into the agent sequence, or ``None`` when agents would not be
            fewer than half the merged tokens (the block then runs plain ToMe).
        unmerge_idx: [B, N] slot of every original token in the merged sequence.
    """

    tokens: TokenMerge
    agents: TokenMerge | None
    unmerge_idx: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens.merge(x)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: each token copies the merged token it went into."""
        return _gather_tokens(x, self.unmerge_idx)


def destination_positions(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Flat grid positions of the destination tokens: one per full ``sx``-by-``sy`` cell.

    With a ``generator`` each cell's destination is drawn uniformly from the cell; without one it
    is the cell's top-left token. Tokens of a ragged right or bottom edge that no full cell covers
    are always sources.
    """
    cells_y, cells_x = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(cells_y, cells_x, dtype=torch.long)
    else:
        offset = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device)
    offset = offset.to(device)
    rows = torch.arange(cells_y, device=device).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(cells_x, device=device).unsqueeze(0) * sx + offset % sx
    return (rows * w + cols).flatten()


def best_destinations(src: torch.Tensor, dst: torch.Tensor, block: int = SCORE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source row, the best cosine-similarity score over destinations and its index.

    ``src`` [B, S, C] and ``dst`` [B, D, C] must already be L2-normalised. Rows are scored in
    blocks, which gives the same result as one big matrix product while keeping the working set in
    cache.
    """
    scores, index = [], []
    dst_t = dst.transpose(1, 2)
    for start in range(0, src.shape[1], block):
        best = torch.bmm(src[:, start : start + block], dst_t).max(dim=-1)
        scores.append(best.values)
        index.append(best.indices)
    return torch.cat(scores, dim=1), torch.cat(index, dim=1)


def _cut(
    ranking: torch.Tensor, best_dst: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, r: int
) -> TokenMerge:
    """The merge that averages the ``r`` top-ranked sources into their best destinations."""
    batch, num_src = ranking.shape
    merged = ranking[:, :r]
    keep_idx = torch.cat([src_pos[ranking[:, r:]], dst_pos.expand(batch, -1)], dim=1)
    dst_slot = best_dst.gather(1, merged) + (num_src - r)
    return TokenMerge(keep_idx=keep_idx, src_idx=src_pos[merged], dst_slot=dst_slot)


def plan_merge(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    r: int,
    agent_r: int = 0,
    generator: torch.Generator | None = None,
) -> MergePlan | None:
    """Plan ToMe (and agent) merges from ``metric`` [B, N, C], the block input on an ``h``-by-``w`` grid.

    Args:
        metric: Features whose cosine similarity decides what merges (the block's input).
        h, w: The token grid, ``h * w == N``.
        sx, sy: Destination cell size.
        r: Tokens to remove for attention (capped at the number of sources).
        agent_r: Tokens to remove for the agents (capped likewise). Agents are planned only when
            ``(N - agent_r) * 2 < N - r``.
        generator: Draws the destination inside each cell; ``None`` takes the top-left token.

    Returns:
        The plan, or ``None`` when nothing would be merged (``r <= 0`` or no sources).
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens != h * w:
        raise ValueError(f"metric has {num_tokens} tokens, which is not a {h}x{w} grid")
    if r <= 0:
        return None
    with torch.no_grad():
        dst_pos = destination_positions(h, w, sx, sy, generator, metric.device)
        is_src = torch.ones(num_tokens, dtype=torch.bool, device=metric.device)
        is_src[dst_pos] = False
        src_pos = is_src.nonzero().squeeze(1)
        num_src = src_pos.shape[0]
        if num_src == 0:
            return None
        r = min(r, num_src)
        agent_r = min(agent_r, num_src)

        normed = metric / metric.norm(dim=-1, keepdim=True)
        best_score, best_dst = best_destinations(normed[:, src_pos], normed[:, dst_pos])
        ranking = best_score.argsort(dim=-1, descending=True)

        tokens = _cut(ranking, best_dst, src_pos, dst_pos, r)
        has_agents = (num_tokens - agent_r) * 2 < num_tokens - r
        agents = _cut(ranking, best_dst, src_pos, dst_pos, agent_r) if has_agents else None
        return MergePlan(tokens=tokens, agents=agents, unmerge_idx=tokens.unmerge_index())
