"""torch.compile and torch.export of patched diffusion transformers (SD3 / SD3.5, Flux, PixArt).

As tests/test_compile.py for UNets: dynamo's "eager" backend traces exactly as inductor does, without
generating code. Timestep 999 runs the recipe's agent phase and 100 its ToMe phase.
"""

import pytest
import torch
from tiny_dit import TINY_DITS, dit_inputs
from torch._dynamo.utils import counters

import agentsd

TIMESTEPS = (999, 980, 100, 90, 990)


def _run(model, kind, t):
    with torch.no_grad():
        return model(**dit_inputs(kind, t))[0]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("kind", list(TINY_DITS))
def test_whole_model_compiles_to_one_graph_for_both_phases(kind):
    """``torch.compile(transformer, fullgraph=True)``: no break, one graph for every step of both phases
    (the phase is a ``torch.cond`` on the timestep), equal to eager."""
    model = TINY_DITS[kind]().eval()
    agentsd.apply_patch(model, ratio=0.4)
    eager = {t: _run(model, kind, t) for t in TIMESTEPS}
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for t in TIMESTEPS:
        assert torch.allclose(_run(compiled, kind, t), eager[t], atol=1e-5), t
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("kind", list(TINY_DITS))
def test_regional_compile_fullgraph_matches_eager(kind):
    """Flux declares its repeated blocks (``compile_repeated_blocks``); SD3's and PixArt's blocks compile
    one by one (``block.compile``), as diffusers' regional compilation would."""
    model = TINY_DITS[kind]().eval()
    agentsd.apply_patch(model, ratio=0.4)
    eager = {t: _run(model, kind, t) for t in TIMESTEPS[1:3]}
    if getattr(type(model), "_repeated_blocks", None):
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
    else:
        for block in model.transformer_blocks:
            block.compile(fullgraph=True, backend="eager")
    for t, expected in eager.items():
        assert torch.allclose(_run(model, kind, t), expected, atol=1e-5), t
    assert not counters["graph_break"]


def test_torch_export_gives_the_eager_output_at_both_phases():
    model = TINY_DITS["sd3"]().eval()
    agentsd.apply_patch(model, ratio=0.4)
    eager = {t: _run(model, "sd3", t) for t in TIMESTEPS[1:3]}
    with torch.no_grad():
        program = torch.export.export(model, (), dit_inputs("sd3", 999), strict=False)
    for t, expected in eager.items():
        with torch.no_grad():
            out = program.module()(**dit_inputs("sd3", t))[0]
        assert torch.allclose(out, expected, atol=1e-5), t


def test_a_traced_flux_call_reads_its_grid_from_the_last_eager_call():
    """Flux's tokens are packed: the grid is read from ``img_ids`` on the host, which a traced call
    cannot do. It takes the grid of the last eager call with the same token count (non-square
    here), else a square one, else it says what to do."""
    model = TINY_DITS["flux"]().eval()
    agentsd.apply_patch(model, ratio=0.4)
    with torch.no_grad():
        inputs = dit_inputs("flux", 999, size=(16, 24))
        eager = model(**inputs)[0]
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(**inputs)[0], eager, atol=1e-5)
        agentsd.apply_patch(model, ratio=0.4)  # a fresh patch has read no grid
        torch._dynamo.reset()
        with pytest.raises(Exception, match="run the patched model once eagerly at this size"):
            compiled(**dit_inputs("flux", 999, size=(16, 24)))
