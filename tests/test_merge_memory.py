"""At high resolution AgentSD's merge path never holds a whole [B, N_src, N_dst] similarity matrix
(nor an N x N attention matrix): sources are scored in row blocks of ``score_rows`` rows.

tracemalloc cannot see torch's allocations, so the largest tensor is found by recording the size
of every output of every aten op (a ``TorchDispatchMode``); a matrix built whole would be one of them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dispatch import CountOps
from tiny import tiny_unet
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import agentsd
from agentsd.merge import SCORE_ELEMENTS, GridLayout, best_destinations, plan_merge, score_rows

FLOAT = 4  # bytes


#: The ops that would hold a similarity or attention matrix: matrix products and softmax.
PRODUCTS = {"bmm", "baddbmm", "mm", "_softmax"}


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor that an aten op returns while active (bytes, and the op);
    ``ops``: only those ops (by name, e.g. ``{"bmm"}``), else every op."""

    def __init__(self, ops: set[str] | None = None) -> None:
        super().__init__()
        self.ops, self.nbytes, self.op = ops, 0, None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.ops is None or func.overloadpacket.__name__ in self.ops:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.nbytes > self.nbytes:
                    self.nbytes, self.op = leaf.nbytes, func
        return out


def _block_bytes(batch: int, num_dst: int) -> int:
    """The scores of one row block, in bytes."""
    return batch * score_rows(batch, num_dst) * num_dst * FLOAT


@pytest.mark.parametrize("sx", [2, 4])
def test_plan_merge_scores_in_row_blocks_at_a_large_grid(sx: int):
    """224 x 224 tokens (SD 1.5's top level at 1792 px): the whole matrix would be 1.2-2.4 GB."""
    side, batch, channels = 224, 2, 4  # few channels: the matrix's size does not depend on them
    n = side * side
    metric = torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(0))
    layout = GridLayout.draw(side, side, sx, sx)  # top-left destinations: the draw does not change the sizes
    num_src, num_dst = layout.src_pos.shape[0], layout.dst_pos.shape[0]
    with LargestOutput() as seen:
        plan = plan_merge(metric, layout, r=int(n * 0.4), agent_r=int(n * 0.95) if sx == 4 else 0)
    assert plan is not None and (plan.agents is not None) == (sx == 4)
    whole = batch * num_src * num_dst * FLOAT
    assert seen.nbytes <= _block_bytes(batch, num_dst), seen.op  # one row block of scores at most
    assert seen.nbytes * 10 < whole, seen.op


def test_small_matrices_are_scored_whole_and_large_ones_in_blocks_of_at_most_score_elements():
    """One product where the matrix fits ``SCORE_ELEMENTS`` (each block is host time on a GPU), and
    no more than ``SCORE_ELEMENTS`` scores per block beyond, unless that is under ``SCORE_BLOCK`` rows."""
    assert score_rows(2, 256) >= 3840  # SD 1.5 at 512 px, the agent phase: 3,840 sources, one block
    assert score_rows(2, 1024) >= 3072  # ... the ToMe phase
    assert score_rows(2, 1024) * 2 * 1024 <= SCORE_ELEMENTS
    assert score_rows(2, 16384) == 1024  # a block of fewer rows would be more ops for little memory
    src = torch.nn.functional.normalize(torch.randn(2, 3000, 4), dim=-1)
    dst = torch.nn.functional.normalize(torch.randn(2, 256, 4), dim=-1)
    for rows, products in ((None, 1), (1024, 3)):
        with LargestOutput({"bmm"}) as seen, CountOps() as count:
            best_destinations(src, dst, block=rows)
        assert count.ops["bmm"] == products, rows
        assert seen.nbytes == 2 * min(3000, rows or 3000) * 256 * FLOAT


@pytest.mark.parametrize(
    "phase,side", [(dict(sx=4, sy=4, agent_ratio=0.95), 128), (dict(sx=2, sy=2, agent_ratio=0.5), 96)]
)
def test_a_patched_forward_at_a_large_grid_holds_no_similarity_or_attention_matrix(phase: dict, side: int):
    """The tiny SD-like UNet at a large latent (``side``: as SD 1.5 at 1024 or 768 px, where the
    phase's whole similarity matrix is over 3 blocks) patched with one of the recipe's phases: no
    matrix product or softmax returns more than one row block of scores, far below the whole
    similarity matrix and an N x N attention matrix.

    (The feed-forward's activations are larger than a row block: they are not what is checked.)"""
    unet = tiny_unet("sd1").eval()
    agentsd.apply_patch(unet, ratio=0.4, schedule="fixed", **phase)
    batch = 2
    n = side * side
    sample = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), LargestOutput(PRODUCTS) as seen:
        unet(sample, 981, encoder_hidden_states=text)
    num_dst = (side // phase["sx"]) ** 2
    assert seen.nbytes <= _block_bytes(batch, num_dst), (seen.op, seen.nbytes)
    assert seen.nbytes * 3 < batch * (n - num_dst) * num_dst * FLOAT  # the whole similarity matrix
    assert seen.nbytes * 20 < batch * n * n * FLOAT  # one head's attention matrix
