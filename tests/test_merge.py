"""Token merging: the plan, merge and unmerge against tomesd and against first principles."""

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

from agentsd.layout import GridLayout, destination_positions, draw_keys
from agentsd.merge import best_destinations, plan_merge


def _key(seed, t=981, block=0):
    return draw_keys(seed, torch.tensor(float(t)), block + 1)[block]


def _plan(x, h, w, sx, sy, r, agent_r=0, key=None):
    return plan_merge(x, GridLayout.draw(h, w, sx, sy, key), r=r, agent_r=agent_r)


def _metric(b=2, h=8, w=8, c=16, seed=0):
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "h,w,sx,sy,ratio", [(8, 8, 2, 2, 0.5), (8, 8, 4, 4, 0.4), (7, 11, 2, 2, 0.3), (9, 6, 3, 2, 0.6)]
)
def test_merge_and_unmerge_match_tomesd(h, w, sx, sy, ratio):
    x = _metric(h=h, w=w)
    r = int(h * w * ratio)
    plan = _plan(x, h, w, sx, sy, r)
    merge, unmerge = bipartite_soft_matching_random2d(x, w, h, sx, sy, r, no_rand=True)

    ours, theirs = plan.merge(x), merge(x)
    assert ours.shape == theirs.shape == (2, h * w - min(r, h * w - (h // sy) * (w // sx)), 16)
    # Same merged tokens, possibly in another order.
    assert torch.allclose(ours.sort(dim=1).values, theirs.sort(dim=1).values, atol=1e-6)
    # Unmerge(merge(x)) does not depend on the order: every token reads the token it went into.
    assert torch.allclose(plan.unmerge(ours), unmerge(theirs), atol=1e-6)


def test_destinations_one_per_full_cell_and_ragged_edges_are_sources():
    h, w, sx, sy = 7, 10, 3, 2
    dst = destination_positions(h, w, sx, sy, _key(3), torch.device("cpu"))
    rows, cols = dst // w, dst % w
    assert len(dst) == (h // sy) * (w // sx) == len(set(dst.tolist()))
    cells = set(zip((rows // sy).tolist(), (cols // sx).tolist()))
    assert len(cells) == len(dst)  # exactly one per cell
    assert rows.max() < (h // sy) * sy and cols.max() < (w // sx) * sx  # never in the ragged edge
    top_left = destination_positions(h, w, sx, sy, None, torch.device("cpu"))
    assert torch.equal(top_left // w % sy, torch.zeros_like(top_left)) and torch.equal(
        top_left % w % sx, torch.zeros_like(top_left)
    )


def test_random_destinations_follow_the_key_only():
    state = torch.get_rng_state()
    cpu = torch.device("cpu")
    a = destination_positions(8, 8, 2, 2, _key(5), cpu)
    assert torch.equal(a, destination_positions(8, 8, 2, 2, _key(5), cpu))
    for other in (_key(6), _key(5, t=961), _key(5, block=1)):  # seed, timestep and block all change the draw
        assert not torch.equal(a, destination_positions(8, 8, 2, 2, other, cpu))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (7, 10, 3, 2), (16, 16, 4, 4)])
def test_layouts_drawn_together_are_each_keys_own_layout(h, w, sx, sy):
    keys = draw_keys(3, torch.tensor(981.0), 4)
    together = GridLayout.draw_each(h, w, sx, sy, keys)
    assert len(together) == 4
    for key, layout in zip(keys, together, strict=True):
        alone = GridLayout.draw(h, w, sx, sy, key)
        assert torch.equal(layout.dst_pos, alone.dst_pos) and torch.equal(layout.src_pos, alone.src_pos)
    assert not torch.equal(together[0].dst_pos, together[1].dst_pos)


def test_the_random_stream_is_pinned():
    """``use_rand`` images depend on these numbers: a change to the hash is a change users see (CHANGELOG)."""
    assert draw_keys(0, torch.tensor(981.0), 3).tolist() == [1141418161, 2779721318, 1542152412]
    assert draw_keys(-1, torch.tensor(1.0), 2).tolist() == [1102457793, 301698860]


def test_hash_constants_compile_in_int32_index_arithmetic():
    """Inductor folds sums and products of an ``arange`` with constants into the kernel's index, which
    Triton evaluates in int32: a constant of 2**31 or more there does not compile on CUDA. Every
    add/mul constant in the traced hash must fit in int32."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def hash_ops(timestep: torch.Tensor) -> torch.Tensor:
        keys = draw_keys(2**40 + 12345, timestep, 3)
        return destination_positions(8, 8, 2, 2, keys[1], timestep.device)

    graph = make_fx(hash_ops)(torch.tensor(981.0)).graph
    constants = [
        arg
        for node in graph.nodes
        if node.op == "call_function" and node.target.__name__.split(".")[0] in ("add", "mul", "sub")
        for arg in node.args
        if isinstance(arg, int)
    ]
    assert constants, "no constant seen: the trace changed shape"
    assert all(-(2**31) <= c < 2**31 for c in constants), [c for c in constants if not -(2**31) <= c < 2**31]


def test_keys_are_exact_integers_and_cells_draw_uniformly():
    """The hash stays in 32 bits, and over many cells every position of a 4 x 4 cell is drawn about
    equally often (a chi-square well inside its 99.9% bound for 15 degrees of freedom)."""
    keys = torch.stack([_key(seed, t, block) for seed in (0, -1, 2**40) for t in (1, 999) for block in (0, 7)])
    assert keys.dtype == torch.int64 and keys.min() >= 0 and keys.max() < 2**32 and len(set(keys.tolist())) == 12
    dst = destination_positions(256, 256, 4, 4, _key(0), torch.device("cpu"))
    offsets = (dst // 256 % 4) * 4 + dst % 256 % 4
    counts = torch.bincount(offsets, minlength=16).double()
    expected = len(dst) / 16
    assert ((counts - expected) ** 2 / expected).sum() < 37.7


def test_blocked_scoring_equals_one_matrix_product():
    src = torch.nn.functional.normalize(torch.randn(2, 300, 8), dim=-1)
    dst = torch.nn.functional.normalize(torch.randn(2, 70, 8), dim=-1)
    full = (src @ dst.transpose(1, 2)).max(dim=-1)
    scores, index = best_destinations(src, dst, block=64)
    assert torch.equal(index, full.indices)
    assert torch.allclose(scores, full.values)


def test_agent_cut_is_the_same_ranking_cut_deeper():
    x = _metric()
    plan = _plan(x, 8, 8, 4, 4, r=25, agent_r=60)
    deeper = _plan(x, 8, 8, 4, 4, r=60)
    assert plan.agents is not None
    assert torch.equal(plan.agents.merge(x), deeper.merge(x))
    assert plan.agents.merge(x).shape[1] == 64 - 60  # all sources merged: only the 4 destinations remain


@pytest.mark.parametrize(
    "r,agent_r,expected",
    [(25, 60, True), (25, 40, False), (10, 37, False), (10, 38, True)],
)
def test_agents_exist_only_when_fewer_than_half_the_merged_tokens(r, agent_r, expected):
    # N = 64: agents exist iff (64 - agent_r) * 2 < 64 - r.
    plan = _plan(_metric(), 8, 8, 2, 2, r=r, agent_r=agent_r)
    assert (plan.agents is not None) is expected


def test_nothing_to_merge_gives_no_plan_and_r_is_capped_at_the_sources():
    x = _metric()
    assert _plan(x, 8, 8, 2, 2, r=0, agent_r=50) is None
    assert _plan(x, 8, 8, 1, 1, r=10) is None  # every token is a destination
    capped = _plan(x, 8, 8, 2, 2, r=1000)
    assert capped.merge(x).shape[1] == 16


@pytest.mark.parametrize("sx,r", [(2, 20), (4, 40)])
def test_every_merged_token_is_the_mean_of_the_tokens_that_unmerge_to_it(sx, r):
    x = _metric(b=2)
    plan = _plan(x, 8, 8, sx, sx, r=r, key=_key(0))
    merged = plan.merge(x)
    slot = plan.unmerge_rows.view(2, 64) - torch.arange(2).unsqueeze(1) * merged.shape[1]
    for b in range(2):
        assert sorted(set(slot[b].tolist())) == list(range(merged.shape[1]))
        for j in range(merged.shape[1]):
            assert torch.allclose(merged[b, j], x[b, slot[b] == j].mean(0), atol=1e-6)
    assert torch.equal(plan.unmerge(merged), merged[torch.arange(2).unsqueeze(1), slot])


def test_grid_mismatch_is_an_error():
    with pytest.raises(ValueError, match="64 tokens but the layout is a grid of 25"):
        _plan(_metric(), 5, 5, 2, 2, r=3)
