"""The patched SD3.5 / Flux / PixArt transformers against an independent implementation of the design
note (``reference_dit.py``): both phases of the recipe, fixed and random destinations, a square and
a ragged non-square grid; agents where the note says; ``remove_patch`` restores the model bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from reference_dit import ReferenceDiT, bipartite_merges, fixed_destinations
from tiny_dit import TINY_DITS, dit_inputs
from tomesd.merge import bipartite_soft_matching_random2d

import agentsd
from agentsd.layout import GridLayout, draw_keys

TOLERANCE = 1e-4
RATIO = 0.4
#: Timesteps (the scheduler's, 0-1000) in the recipe's agent phase (t >= 600) and its ToMe phase.
TIMESTEPS = {"agents": 999, "tome": 100}
#: Latent sizes: an 8x8 token grid, and a 10x14 one whose bottom and right edges 4x4 cells leave ragged.
SIZES = {"square": (16, 16), "ragged": (20, 28)}
#: Attention layers each family's reference runs per call: SD3.5's dual-attention block has two.
ATTENTION_CALLS = {"sd3": 3, "flux": 2, "pixart": 2}


@pytest.fixture(scope="module")
def models():
    return {kind: make().eval() for kind, make in TINY_DITS.items()}


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _random_destinations(model, inputs, phase):
    """The destinations the patch draws: block ``i`` (in running order) of the call keyed by
    ``draw_keys(seed 0, the call's first timestep as the model receives it, number of blocks)[i]``."""
    num_blocks = len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", ()))
    keys = draw_keys(0, inputs["timestep"].flatten()[0].to(torch.float32), num_blocks)
    return lambda index, h, w: GridLayout.draw(h, w, phase.sx, phase.sy, keys[index]).dst_pos.tolist()


def _reference_output(model, inputs, phase, destinations, merge_mlp=False):
    reference = ReferenceDiT(
        model, phase.ratio, phase.agent_ratio, phase.sx, phase.sy, destinations, merge_mlp=merge_mlp
    )
    try:
        return _forward(model, inputs), reference
    finally:
        reference.remove()


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (10, 14, 4, 4), (9, 7, 3, 2)])
def test_reference_matching_equals_tomesd_with_fixed_destinations(h, w, sx, sy):
    """The reference's bipartite matching is ToMe's: merging then unmerging features gives what
    ``tomesd`` gives, for a ToMe cut and an agent cut (all sources merged)."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(2, h * w, 16, generator=generator)
    x = torch.randn(2, h * w, 8, generator=generator)
    cuts = [int(h * w * RATIO), h * w]
    dst = fixed_destinations(h, w, sx, sy)
    for r, merge in zip(cuts, bipartite_merges(metric, dst, cuts)):
        tome_merge, tome_unmerge = bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, no_rand=True)
        assert merge.weights.shape[1] == h * w - min(r, h * w - len(dst))
        assert torch.allclose(merge.unmerge(merge.merge(x)), tome_unmerge(tome_merge(x)), atol=1e-6)


@pytest.mark.parametrize("kind", TINY_DITS)
def test_reference_without_merging_is_the_model(models, kind):
    """With nothing merged (ratio 0) the reference's processors compute the model's own attention:
    its joint attention, text rows, rotary embedding and single-stream layout are the model's."""
    model = models[kind]
    inputs = dit_inputs(kind, TIMESTEPS["agents"], size=SIZES["ragged"])
    expected, reference = _reference_output(model, inputs, agentsd.Phase(ratio=0.0, agent_ratio=0.0), None)
    assert len(reference.branches) == ATTENTION_CALLS[kind]
    assert (expected - _forward(model, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("use_rand", [False, True], ids=["fixed", "random"])
@pytest.mark.parametrize("phase_name", TIMESTEPS)
@pytest.mark.parametrize("kind", TINY_DITS)
def test_patched_transformer_equals_reference(models, kind, phase_name, use_rand, size):
    """``apply_patch(model, ratio=0.4)`` (the recipe) gives the reference's output to 1e-4, with
    agents in every attention layer in the agent phase and in none in the ToMe phase; removing the
    patch gives back the unpatched output exactly."""
    model = models[kind]
    inputs = dit_inputs(kind, TIMESTEPS[phase_name], size=SIZES[size])
    phase = agentsd.recipe(RATIO)[0 if phase_name == "agents" else 1]
    before = _forward(model, inputs)
    agentsd.apply_patch(model, ratio=RATIO, use_rand=use_rand)
    try:
        patched = _forward(model, inputs)
        summary = agentsd.patch_summary(model)
    finally:
        agentsd.remove_patch(model)
    assert torch.equal(_forward(model, inputs), before)

    destinations = _random_destinations(model, inputs, phase) if use_rand else None
    expected, reference = _reference_output(model, inputs, phase, destinations)
    difference = (patched - expected).abs().max().item()
    assert difference <= TOLERANCE, difference
    assert (patched - before).abs().max() > 1e-3  # merging did change the output

    with_agents = phase_name == "agents"
    branches = [branch for *_, branch in reference.branches]
    assert branches == ["agents" if with_agents else "softmax"] * ATTENTION_CALLS[kind]
    runs = [run for block in summary.blocks for _, run in block.runs]
    assert len(runs) == ATTENTION_CALLS[kind]
    assert all(run.merged and run.agents == with_agents for run in runs)
    if use_rand:  # the draw did move destinations off the cells' top-left tokens
        h, w = reference.grid
        assert any(sorted(destinations(i, h, w)) != fixed_destinations(h, w, phase.sx, phase.sy) for i in range(2))


@pytest.mark.parametrize("kind", ["sd3", "flux", "pixart"])
def test_merge_mlp_equals_reference(models, kind):
    """With ``merge_mlp`` the feed-forward (Flux's single-stream block: its MLP branch) runs on the
    block's merged tokens too, in the agent phase with random destinations."""
    model = models[kind]
    inputs = dit_inputs(kind, TIMESTEPS["agents"], size=SIZES["ragged"])
    phase = agentsd.recipe(RATIO)[0]
    with agentsd.patched(model, ratio=RATIO, merge_mlp=True):
        patched = _forward(model, inputs)
    expected, reference = _reference_output(model, inputs, phase, _random_destinations(model, inputs, phase), True)
    assert sum(branch == "merged" for *_, branch in reference.branches) == 2
    assert (patched - expected).abs().max() <= TOLERANCE


def test_odd_batch_uses_fixed_destinations(models):
    """An odd batch of a guided model (SD3) cannot hold whole guidance pairs: the patch uses the fixed
    top-left destinations even with ``use_rand``."""
    model = models["sd3"]
    inputs = dit_inputs("sd3", TIMESTEPS["agents"], batch=1, size=SIZES["ragged"])
    with agentsd.patched(model, ratio=RATIO, use_rand=True):
        patched = _forward(model, inputs)
    expected, _ = _reference_output(model, inputs, agentsd.recipe(RATIO)[0], None)
    assert (patched - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("kind", ["flux", "pixart"])
def test_grid_without_a_full_cell_runs_unmerged(models, kind):
    """An 8x2 token grid holds no full 4x4 cell of the agent phase: no destination, so nothing can
    merge and the blocks run as the model does."""
    model = models[kind]
    inputs = dit_inputs(kind, TIMESTEPS["agents"], size=(16, 4))
    with agentsd.patched(model, ratio=RATIO):
        patched = _forward(model, inputs)
        runs = [run for block in agentsd.patch_summary(model).blocks for _, run in block.runs]
    assert torch.equal(patched, _forward(model, inputs))
    assert runs and not any(run.merged for run in runs)
