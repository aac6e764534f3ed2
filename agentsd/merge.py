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
(:class:`GridLayout`) depends only on the grid and a random key hashed from the seed, the timestep
tensor and the block (:func:`draw_keys`); :func:`plan_merge` then needs only dense, fixed-size tensor
operations on the block input: no ``nonzero()``, no ``.item()``, no branch on tensor values. Both
compile with ``fullgraph=True``, export, and issue no host-device synchronisation on CUDA.

No ``torch.gather`` runs on features, so the MPS bug that ``tomesd`` works around (gather with a
last dimension of 1) cannot arise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Sources are scored against destinations in blocks of ``SCORE_BLOCK`` rows, so that a large
#: [B, N_src, N_dst] similarity matrix (400 MB at 16k tokens) never exists at once and each block's
#: scores stay in cache (on the CPU, 4,096-row blocks took 1.3x as long at 1024 px). A matrix of up to
#: ``SCORE_ELEMENTS`` scores (32 MiB in float32: the recipe's at 512 px) is scored whole: as fast on
#: the CPU, and up to 11 fewer ops per plan, each of them host time on a GPU in eager mode.
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


_MASK32 = 0xFFFFFFFF


def _int32(value: int) -> int:
    """``value``'s residue mod 2**32 as a signed 32-bit int (its two's-complement reading).

    The hash is arithmetic mod 2**32 (every sum and product is masked with ``_MASK32``), so a
    constant may be any member of its residue class. What is added to or multiplied with an
    ``arange`` must be the signed one: inductor folds such arithmetic into the kernel's index
    expression, which Triton evaluates in int32 and where a literal of 2**31 or more does not
    compile ("Scalar 3266489909 is out of range for type int32", torch 2.11 on an H200); a product
    that wraps there still has the right low 32 bits, which is all the mask keeps.
    """
    value &= _MASK32
    return value - 2**32 if value >= 2**31 else value


_GOLDEN32 = _int32(0x9E3779B1)  # 2**32 / golden ratio: spreads consecutive counters over the 32-bit range
_BLOCK_SALT32 = _int32(0xC2B2AE35)


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash finaliser on int64 tensors (or Python ints) holding values in [0, 2**32).

    Every intermediate stays below 2**59, so the int64 arithmetic never overflows, on any device and
    under any compiler: the same counters give the same bits everywhere.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def draw_keys(seed: int, timestep: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The random keys of blocks ``0 .. num_blocks - 1``' destinations at one UNet call: [num_blocks] int64.

    A counter-based draw instead of a reseeded generator: block ``i``'s key is a hash of (``seed``, the
    noise level in thousandths of a timestep, ``i``), computed with integer tensor ops on
    ``timestep``'s device. Nothing is read back to the host and no generator state exists, so the
    draw is the same in eager mode, in a compiled graph and in an exported program, and a
    generation is reproducible whatever ran before it. All the blocks' keys come from one tensor op:
    in a compiled graph that is one small kernel, and no block's code holds a constant of its own
    (a block number baked into each block's hash made inductor generate and compile every block's
    merging code anew).
    """
    # Both 32-bit halves of a 64-bit (two's complement) seed, mixed as Python ints; then each block, on
    # the device (a list of salts made into a tensor would be a host-to-device copy, a sync, per call).
    low, high = seed & _MASK32, (seed >> 32) & _MASK32
    seed_part = _int32(low * 0x85EBCA6B + high * 0x27D4EB2F)
    blocks = torch.arange(num_blocks, dtype=torch.int64, device=timestep.device)
    salts = _mix32((seed_part + blocks * _BLOCK_SALT32) & _MASK32)
    level = (timestep.to(torch.float32) * 1000).round().to(torch.int64)
    return _mix32((level * _GOLDEN32 + salts) & _MASK32)


def destination_positions(
    h: int, w: int, sx: int, sy: int, key: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Flat grid positions of the destination tokens: one per full ``sx``-by-``sy`` cell.

    With a ``key`` (one of :func:`draw_keys`) each cell's destination is drawn uniformly from the cell by
    hashing (key, cell index); without one it is the cell's top-left token. Tokens of a ragged
    right or bottom edge that no full cell covers are always sources. ``key`` may hold several keys
    (any shape K): the result is then [*K, D], one row of destinations per key, from the same ops.
    """
    cells_y, cells_x = h // sy, w // sx
    if key is None:
        offset = torch.zeros(cells_y, cells_x, dtype=torch.long, device=device)
    else:
        cells = torch.arange(cells_y * cells_x, dtype=torch.long, device=device)
        mixed = _mix32((key.to(device).unsqueeze(-1) + cells * _GOLDEN32) & _MASK32)
        offset = (mixed % (sy * sx)).unflatten(-1, (cells_y, cells_x))
    rows = torch.arange(cells_y, device=device).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(cells_x, device=device).unsqueeze(0) * sx + offset % sx
    return (rows * w + cols).flatten(-2)


@dataclass(frozen=True)
class GridLayout:
    """Which tokens of an ``h``-by-``w`` grid are destinations and which are sources.

    It depends only on the grid, the cell size and the random key, never on the features.

    Attributes:
        dst_pos: [D] flat grid positions of the destinations (one per full cell), ascending.
        src_pos: [S] positions of every other token, ascending.
    """

    dst_pos: torch.Tensor
    src_pos: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.dst_pos.shape[0] + self.src_pos.shape[0]

    @classmethod
    def draw(
        cls,
        h: int,
        w: int,
        sx: int,
        sy: int,
        key: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> GridLayout:
        """The layout of an ``h``-by-``w`` grid with ``sx``-by-``sy`` cells (see :func:`destination_positions`)."""
        if device is None:
            device = key.device if key is not None else torch.device("cpu")
        return cls(*_split_grid(h * w, destination_positions(h, w, sx, sy, key, device)))

    @classmethod
    def draw_each(cls, h: int, w: int, sx: int, sy: int, keys: torch.Tensor) -> list[GridLayout]:
        """One layout per key of ``keys`` [K], all drawn by one set of tensor ops.

        The same layouts as :meth:`draw` with each key, at the cost of one: the blocks of a level share
        their grid, and on a GPU in eager mode every op is host time (about 35 ops per layout).
        """
        dst_pos, src_pos = _split_grid(h * w, destination_positions(h, w, sx, sy, keys, keys.device))
        return [cls(dst, src) for dst, src in zip(dst_pos.unbind(0), src_pos.unbind(0))]


def _split_grid(num_tokens: int, drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) positions, each ascending, of grids of ``num_tokens`` whose
    destinations are ``drawn`` [..., D] (any order).

    A stable sort of the destination flags lists the sources, then the destinations, each in
    ascending order, without ``nonzero()``, whose data-dependent size would stall the device. Both
    are taken from the sort's output: a compiler then computes the hash behind ``drawn`` once, where
    it would otherwise inline it into every kernel that indexes by a destination (inductor: the tiny
    SD 1.x UNet compiled whole in 43 s instead of 68).
    """
    flags = torch.zeros(*drawn.shape[:-1], num_tokens, dtype=torch.uint8, device=drawn.device)
    order = flags.scatter_(-1, drawn, 1).argsort(dim=-1, stable=True)
    num_src = num_tokens - drawn.shape[-1]
    return order[..., num_src:], order[..., :num_src]


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
        The plan, or ``None`` when nothing would be merged (``r <= 0`` or no sources). Which of the
        two it is depends only on the shapes and ``r``, never on the values, so the call never waits
        for the device.
    """
    num_tokens = metric.shape[1]
    if num_tokens != layout.num_tokens:
        raise ValueError(f"metric has {num_tokens} tokens but the layout is a grid of {layout.num_tokens}")
    num_src = layout.src_pos.shape[0]
    if r <= 0 or num_src == 0:
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
