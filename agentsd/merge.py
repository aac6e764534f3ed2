"""Token merging by bipartite soft matching on a 2-D token grid (ToMe for Stable Diffusion).

A block's N tokens are split into destinations (one per ``sx``-by-``sy`` cell of the grid) and
sources (every other token). Each source is scored by its best cosine similarity to any
destination; the ``r`` best-matched sources are averaged into their destinations and the rest are
kept. AgentSD makes a second, stronger cut of the *same* ranking: its ``agent_r`` best sources are
merged away too, and what is left are the agent tokens.

A merge is stored as index tensors (:class:`TokenMerge`), not as closures, so that merging is two
row selections and one ``index_add_``, unmerging is a single row selection (every original token
copies the merged token it went into), and the plan can be inspected in tests.

Planning never waits for the device. Which tokens are destinations and which are sources
(:class:`~agentsd.layout.GridLayout`) is drawn beforehand; :func:`plan_merge` then needs only dense,
fixed-size tensor operations on the block input: no ``nonzero()``, no ``.item()``, no branch on
tensor values. It compiles with ``fullgraph=True``, exports, and issues no host-device
synchronisation on CUDA. :func:`make_layout` and :func:`make_plan` apply a schedule's
:class:`~agentsd.config.Phase` to a block: the grid's layout, then the plan from the block input.

No ``torch.gather`` runs on features, so the MPS bug that ``tomesd`` works around (gather with a
last dimension of 1) cannot arise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import Phase
from .layout import GridLayout

logger = logging.getLogger("agentsd")

#: Sources are scored against destinations in blocks of ``SCORE_BLOCK`` rows, so that a large
#: [B, N_src, N_dst] similarity matrix (400 MB at 16k tokens) never exists at once and each block's
#: scores stay in cache (larger blocks are slower on the CPU). A matrix of up to ``SCORE_ELEMENTS``
#: scores (32 MiB in float32: the recipe's at 512 px) is scored whole: as fast on the CPU, and fewer
#: ops per plan, each of them host time on a GPU in eager mode.
SCORE_BLOCK = 1024
SCORE_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class TokenMerge:
    """One bipartite merge of N tokens into M = N - r.

    The merged sequence is ``[kept sources..., destinations...]``. Indices are rows of the
    flattened [B * tokens, C] features: ``index_select`` / ``index_add_`` on rows are many times
    faster on the CPU than ``gather`` / ``scatter_reduce`` with indices expanded over the channels,
    and they add the same values in the same order.

    Attributes:
        keep_rows: [B * M] input row of each merged-sequence token.
        src_rows: [B * r] input rows of the sources that are averaged away.
        dst_rows: [B * r] merged-sequence row of each such source's destination.
        dst_count: [B, D, 1] float32: how many tokens (itself included) each destination averages.
        num_tokens: N.
    """

    keep_rows: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    dst_count: torch.Tensor
    num_tokens: int

    @property
    def num_merged(self) -> int:
        """M, the length of the merged sequence."""
        return self.keep_rows.shape[0] // self.dst_count.shape[0]

    def positions(self) -> torch.Tensor:
        """[B, M]: the grid position of the token that stands for each merged token (a kept source its
        own, a destination its own: the merged mean takes the destination's place, as in ToMe).

        A model with position-dependent attention (Flux's rotary embedding) reads the merged tokens'
        positions here.
        """
        batch = self.dst_count.shape[0]
        rows = self.keep_rows.view(batch, -1)
        first_row = torch.arange(batch, device=rows.device).unsqueeze(1) * self.num_tokens
        return rows - first_row

    def unmerge_rows(self) -> torch.Tensor:
        """[B * N]: for every input row, the merged-sequence row it went into (kept tokens their own
        slot, merged-away sources their destination's)."""
        rows = torch.empty(self.dst_count.shape[0] * self.num_tokens, dtype=torch.long, device=self.keep_rows.device)
        rows.index_copy_(0, self.keep_rows, torch.arange(self.keep_rows.shape[0], device=rows.device))
        return rows.index_copy_(0, self.src_rows, self.dst_rows)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, M, C]: destinations become the mean of themselves and their sources."""
        batch, _, channels = x.shape
        rows = x.reshape(-1, channels)
        merged = rows.index_select(0, self.keep_rows)
        merged.index_add_(0, self.dst_rows, rows.index_select(0, self.src_rows))
        merged = merged.view(batch, self.num_merged, channels)
        merged[:, merged.shape[1] - self.dst_count.shape[1] :].div_(self.dst_count)
        return merged


@dataclass(frozen=True)
class MergePlan:
    """The merges of one block call: tokens for attention, and (optionally) the agents.

    Attributes:
        tokens: Merges the block's N tokens into M = N - r.
        agents: Merges the same tokens into the agent sequence, or ``None`` when agents would not be
            fewer than half the merged tokens (the block then runs plain ToMe).
        unmerge_rows: [B * N] row of the merged sequence that each original token copies.
    """

    tokens: TokenMerge
    agents: TokenMerge | None
    unmerge_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens.merge(x)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M, C] -> [B, N, C]: each token copies the merged token it went into."""
        batch, _, channels = x.shape
        return x.reshape(-1, channels).index_select(0, self.unmerge_rows).view(batch, self.num_tokens, channels)


def score_rows(batch: int, num_src: int, num_dst: int) -> int:
    """Sources scored per block (see ``SCORE_BLOCK``): all of them when their matrix is small."""
    return num_src if batch * num_src * num_dst <= SCORE_ELEMENTS else SCORE_BLOCK


def best_destinations(
    src: torch.Tensor, dst: torch.Tensor, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source row, the best cosine-similarity score over destinations and its index.

    ``src`` [B, S, C] and ``dst`` [B, D, C] must already be L2-normalised. Rows are scored in
    blocks of ``block`` (default :func:`score_rows`), which gives the same result as one big matrix
    product while bounding its memory.
    """
    dst_t = dst.transpose(1, 2)
    block = block or score_rows(*src.shape[:2], dst.shape[1])
    if src.shape[1] <= block:
        best = torch.bmm(src, dst_t).max(dim=-1)
        return best.values, best.indices
    scores, index = [], []
    for start in range(0, src.shape[1], block):
        best = torch.bmm(src[:, start : start + block], dst_t).max(dim=-1)
        scores.append(best.values)
        index.append(best.indices)
    return torch.cat(scores, dim=1), torch.cat(index, dim=1)


def _cut(
    ranked_rows: torch.Tensor, ranked_dst: torch.Tensor, dst_rows: torch.Tensor, sample: torch.Tensor, r: int
) -> TokenMerge:
    """The merge that averages the ``r`` top-ranked sources into their best destinations.

    Args:
        ranked_rows: [B, S] input row of every source, best-matched first.
        ranked_dst: [B, S] index of each of those sources' best destination.
        dst_rows: [B, D] input row of every destination.
        sample: [B, 1] sample numbers, to offset a sample's merged rows.
        r: Sources to merge away.

    Everything per sample is computed once by :func:`plan_merge` and both cuts slice it: each op
    costs host time on a GPU in eager mode whatever its size.
    """
    batch, num_src = ranked_rows.shape
    num_dst = dst_rows.shape[1]
    num_merged = num_src + num_dst - r
    dst_of_src = ranked_dst[:, :r]
    dst_count = torch.ones(batch, num_dst, device=dst_rows.device).scatter_add_(
        1, dst_of_src, torch.ones(dst_of_src.shape, device=dst_rows.device)
    )
    return TokenMerge(
        keep_rows=torch.cat([ranked_rows[:, r:], dst_rows], dim=1).flatten(),
        src_rows=ranked_rows[:, :r].flatten(),
        # The destinations follow the num_src - r kept sources in a sample's merged sequence.
        dst_rows=(dst_of_src + (sample * num_merged + (num_src - r))).flatten(),
        dst_count=dst_count.unsqueeze(-1),
        num_tokens=num_src + num_dst,
    )


def plan_merge(metric: torch.Tensor, layout: GridLayout, r: int, agent_r: int = 0) -> MergePlan | None:
    """Plan ToMe (and agent) merges from ``metric`` [B, N, C], the block input, on ``layout``'s grid.

    Args:
        metric: Features whose cosine similarity decides what merges (the block's input).
        layout: Destinations and sources of the grid (``layout.num_tokens == N``).
        r: Tokens to remove for attention (capped at the number of sources).
        agent_r: Tokens to remove for the agents (capped likewise). Agents are planned only when
            ``(N - agent_r) * 2 < N - r``.

    Returns:
        The plan, or ``None`` when nothing would be merged (``r <= 0``, no sources, or no destination:
        a grid narrower or shorter than one cell has no full cell). Which of the
        two it is depends only on the shapes and ``r``, never on the values, so the call never waits
        for the device.
    """
    num_tokens = metric.shape[1]
    if num_tokens != layout.num_tokens:
        raise ValueError(f"metric has {num_tokens} tokens but the layout is a grid of {layout.num_tokens}")
    num_src, num_dst = layout.src_pos.shape[0], layout.dst_pos.shape[0]
    if r <= 0 or num_src == 0 or num_dst == 0:
        return None
    r, agent_r = min(r, num_src), min(agent_r, num_src)
    with torch.no_grad():
        # Select, then normalise each part in place: the same per-row values as normalising the
        # whole metric first, without writing a normalised copy of all N tokens.
        src, dst = metric.index_select(1, layout.src_pos), metric.index_select(1, layout.dst_pos)
        src.div_(src.norm(dim=-1, keepdim=True))
        dst.div_(dst.norm(dim=-1, keepdim=True))
        best_score, best_dst = best_destinations(src, dst)
        # One full ranking serves both cuts: its top r and top agent_r are the two merged sets.
        ranking = best_score.argsort(dim=-1, descending=True)
        # Once for both cuts: the input rows of the ranked sources and of the destinations (see TokenMerge).
        batch = metric.shape[0]
        sample = torch.arange(batch, device=metric.device).unsqueeze(1)
        first_row = sample * num_tokens
        ranked_rows = layout.src_pos.index_select(0, ranking.flatten()).view(batch, num_src) + first_row
        ranked_dst = best_dst.gather(1, ranking)
        dst_rows = layout.dst_pos + first_row
        tokens = _cut(ranked_rows, ranked_dst, dst_rows, sample, r)
        has_agents = (num_tokens - agent_r) * 2 < num_tokens - r
        agents = _cut(ranked_rows, ranked_dst, dst_rows, sample, agent_r) if has_agents else None
        # Only the attention tokens are unmerged; the agents never are.
        return MergePlan(tokens=tokens, agents=agents, unmerge_rows=tokens.unmerge_rows())


def merges_any(grid: tuple[int, int], phase: Phase) -> bool:
    """Whether ``phase`` merges any token of an (h, w) ``grid``."""
    h, w = grid
    return int(h * w * phase.ratio) > 0


def make_layout(
    grid: tuple[int, int], phase: Phase, key: torch.Tensor | None, device: torch.device
) -> GridLayout | None:
    """Destinations and sources of an (h, w) ``grid`` in ``phase`` (random from ``key``, else fixed).

    Returns:
        The layout, or ``None`` if the phase merges nothing there.
    """
    return GridLayout.draw(*grid, phase.sx, phase.sy, key, device) if merges_any(grid, phase) else None


def make_plan(phase: Phase, layout: GridLayout | None, metric: torch.Tensor) -> MergePlan | None:
    """The merge plan of ``phase`` for block input ``metric`` [B, N, C] on ``layout``.

    Returns:
        The plan, or ``None`` without a layout or when the block's tokens do not fill the layout's
        grid (then the block runs unmerged, with a warning: its grid was guessed wrongly).
    """
    if layout is None:
        return None
    num_tokens = metric.shape[1]
    if num_tokens != layout.num_tokens:
        logger.warning(
            "agentsd: a block expected a grid of %d tokens but got %d; it runs unmerged",
            layout.num_tokens,
            num_tokens,
        )
        return None
    return plan_merge(metric, layout, r=int(num_tokens * phase.ratio), agent_r=int(num_tokens * phase.agent_ratio))
