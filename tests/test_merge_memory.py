"""At high resolution AgentSD's merge path never holds a whole [B, N_src, N_dst] similarity matrix
(nor an N x N attention matrix): sources are scored in row blocks of ``SCORE_BLOCK``
(a matrix of at most ``SCORE_ELEMENTS`` scores, far smaller, is scored whole).

tracemalloc cannot see torch's allocations, so the largest tensor is found by recording the size
of every output of every aten op (a ``TorchDispatchMode``); a matrix built whole would be one of them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from op_counter import CountOps
from tiny import tiny_unet
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import agentsd
from agentsd.layout import GridLayout
from agentsd.merge import SCORE_BLOCK, SCORE_ELEMENTS, best_destinations, plan_merge, score_rows

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


@pytest.mark.parametrize("sx", [2, 4])
def test_plan_merge_scores_in_row_blocks_at_a_large_grid(sx: int):
    """160 x 160 tokens (SD 1.5's top level at 1280 px): the whole matrix would be 983 MB (sx = 2)."""
    side, batch, channels = 160, 2, 4  # few channels: the matrix's size does not depend on them
    n = side * side
    metric = torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(0))
    layout = GridLayout.draw(side, side, sx, sx)  # top-left destinations: the draw does not change the sizes
    num_src, num_dst = layout.src_pos.shape[0], layout.dst_pos.shape[0]
    with LargestOutput() as seen:
        plan = plan_merge(metric, layout, r=int(n * 0.4), agent_r=int(n * 0.95) if sx == 4 else 0)
    assert plan is not None and (plan.agents is not None) == (sx == 4)
    whole = batch * num_src * num_dst * FLOAT
    assert seen.nbytes <= batch * SCORE_BLOCK * num_dst * FLOAT < whole / 10, seen.op  # one row block at most


def test_small_matrices_are_scored_whole_and_large_ones_in_row_blocks():
    """One product where the matrix has at most ``SCORE_ELEMENTS`` scores (each block is host time on
    a GPU), blocks of ``SCORE_BLOCK`` rows beyond."""
    assert score_rows(2, 3840, 256) == 3840  # SD 1.5 at 512 px, the agent phase: one block
    assert score_rows(2, 3072, 1024) == 3072  # ... the ToMe phase
    assert score_rows(2, 8640, 576) == SCORE_BLOCK  # 768 px
    assert 2 * 3072 * 1024 <= SCORE_ELEMENTS < 2 * 8640 * 576
    src = torch.nn.functional.normalize(torch.randn(2, 3000, 4), dim=-1)
    dst = torch.nn.functional.normalize(torch.randn(2, 256, 4), dim=-1)
    for rows, products in ((None, 1), (1024, 3)):
        with LargestOutput({"bmm"}) as seen, CountOps() as count:
            best_destinations(src, dst, block=rows)
        assert count.ops["bmm"] == products, rows
        assert seen.nbytes == 2 * min(3000, rows or 3000) * 256 * FLOAT


@pytest.mark.parametrize("phase", [dict(sx=4, sy=4, agent_ratio=0.95), dict(sx=2, sy=2, agent_ratio=0.5)])
def test_a_patched_forward_at_a_large_grid_holds_no_similarity_or_attention_matrix(phase: dict):
    """The tiny SD-like UNet at a 96 x 96 latent (9,216 top-level tokens, as SD 1.5 at 768 px),
    patched with one of the recipe's phases: no matrix product or softmax returns more than one row
    block of scores, far below the whole similarity matrix and an N x N attention matrix.

    (The feed-forward's activations are larger than a row block: they are not what is checked.)"""
    unet = tiny_unet("sd1").eval()
    agentsd.apply_patch(unet, ratio=0.4, schedule="fixed", **phase)
    side, batch = 96, 2
    n = side * side
    sample = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), LargestOutput(PRODUCTS) as seen:
        unet(sample, 981, encoder_hidden_states=text)
    num_dst = (side // phase["sx"]) ** 2
    assert seen.nbytes <= batch * SCORE_BLOCK * num_dst * FLOAT, (seen.op, seen.nbytes)
    assert seen.nbytes * 5 < batch * (n - num_dst) * num_dst * FLOAT  # the whole similarity matrix
    assert seen.nbytes * 20 < batch * n * n * FLOAT  # one head's attention matrix
