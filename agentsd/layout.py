"""Which tokens of a grid are destinations and which are sources, and the random draw behind it.

ToMe for Stable Diffusion splits a block's token grid into ``sx``-by-``sy`` cells with one destination
per full cell; every other token is a source. The layout depends only on the grid, the cell size and
a random key, never on the features, so it can be drawn before the block runs, once for all the
blocks of a level.

The random choice is counter-based: a key is a hash of (seed, timestep, block) computed with integer
tensor ops on the timestep's device (:func:`draw_keys`), and each cell's destination a hash of (key,
cell). Nothing is read back to the host and no generator state exists, so eager, compiled and
exported calls draw alike, a generation is reproducible whatever ran before it, and any engine that
passes the same seed, timestep and block order draws the same destinations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _int32(value: int) -> int:
    """``value``'s residue mod 2**32 as a signed 32-bit int (its two's-complement reading).

    The hash is arithmetic mod 2**32 (every sum and product is masked with ``_MASK32``), so a
    constant may be any member of its residue class. What is added to or multiplied with an
    ``arange`` must be the signed one: inductor folds such arithmetic into the kernel's index
    expression, which Triton evaluates in int32 and where a literal of 2**31 or more does not
    compile ("Scalar 3266489909 is out of range for type int32" from Triton); a product
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
    it would otherwise inline it into every kernel that indexes by a destination (a slower compile).
    """
    flags = torch.zeros(*drawn.shape[:-1], num_tokens, dtype=torch.uint8, device=drawn.device)
    order = flags.scatter_(-1, drawn, 1).argsort(dim=-1, stable=True)
    num_src = num_tokens - drawn.shape[-1]
    return order[..., num_src:], order[..., :num_src]
