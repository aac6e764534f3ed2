"""ToDo, token downsampling (eval/todo.py and its registry entry ``todo``), on tiny models.

The processor must compute attention with every query and with keys and values from the token grid
downsampled (checked against the formula written out here, with grid slicing and pooling, not
``F.interpolate``), hand every call it does not downsample to the processor it replaced (bit for
bit), patch the top attention level (SD 1.x: downsample 1; SDXL: 2), stop after its step fraction,
and come off exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import methods as m  # noqa: E402
import todo  # noqa: E402
from tiny import TEXT_DIM, tiny_unet  # noqa: E402

#: The token grid (h, w) -> downsampled (h, w) grid, for each mode the formula below writes out at factor 2.
SLICES = {
    "nearest-exact": lambda grid: grid[..., 1::2, 1::2],  # source index floor((i + 0.5) * 2) = 2i + 1
    "nearest": lambda grid: grid[..., ::2, ::2],  # source index floor(i * 2) = 2i
    "area": lambda grid: torch.nn.functional.avg_pool2d(grid, 2),
}


def grid_of(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens [B, h*w, C] as the image [B, C, h, w] they were flattened from (row by row)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def reference_attention(attn: Attention, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: queries of every token of ``x``, keys and values of the tokens of ``grid``."""
    b, n, _ = x.shape
    context = grid.flatten(2).transpose(1, 2)
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // attn.heads
    q, k, v = (t.reshape(b, -1, attn.heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, attn.heads * d)
    return attn.to_out[0](out)


def layer() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8).eval()


def processor(state: todo.ToDoState, factor: float = 2.0) -> todo.ToDoAttnProcessor:
    return todo.ToDoAttnProcessor(state, downsample=1, factor=factor, inner=AttnProcessor2_0())


@pytest.mark.parametrize("mode", list(SLICES))
def test_one_attention_layer_matches_the_formula_on_a_non_square_grid(mode):
    attn, x = layer(), torch.randn(2, 6 * 10, 32)
    attn.set_processor(processor(todo.ToDoState(size=(6, 10), mode=mode)))
    with torch.no_grad():
        out = attn(x)
        assert out.shape == x.shape
        torch.testing.assert_close(
            out, reference_attention(attn, x, SLICES[mode](grid_of(x, 6, 10))), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize(
    "state, factor, tokens",
    [
        (todo.ToDoState(size=(6, 10)), 1.0, 60),  # factor 1: nothing to downsample
        (todo.ToDoState(size=(1, 1)), 2.0, 1),  # a grid too small to shrink
        (todo.ToDoState(size=(6, 10)), 2.0, 64),  # tokens that are not the grid's (h * w != N)
        (todo.ToDoState(size=(6, 10), active=False), 2.0, 60),  # past its step fraction
    ],
)
def test_calls_it_does_not_downsample_are_the_replaced_processors_bit_for_bit(state, factor, tokens):
    attn, x = layer(), torch.randn(2, tokens, 32)
    with torch.no_grad():
        plain = attn(x)
        attn.set_processor(processor(state, factor))
        assert torch.equal(attn(x), plain)


def test_masked_and_cross_attention_calls_go_to_the_replaced_processor():
    attn, x, mask = layer(), torch.randn(2, 60, 32), torch.randn(2, 1, 60)
    with torch.no_grad():
        plain = attn(x, attention_mask=mask), attn(x, encoder_hidden_states=x[:, :7])
        attn.set_processor(processor(todo.ToDoState(size=(6, 10))))
        assert torch.equal(attn(x, attention_mask=mask), plain[0])
        assert torch.equal(attn(x, encoder_hidden_states=x[:, :7]), plain[1])
        assert not torch.equal(attn(x), attn(x, encoder_hidden_states=x))


def test_a_unet_block_matches_the_formula_with_sample_as_a_keyword():
    """An odd, non-square latent (13 x 15): keys and values from int(13 / 2) x int(15 / 2) = 6 x 7 tokens."""
    unet = tiny_unet("sd1").eval()
    sample, text = torch.randn(2, 4, 13, 15), torch.randn(2, 77, TEXT_DIM)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = []
    attn.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    remove = todo.apply_todo(unet, {1: 2.0})
    with torch.no_grad():
        unet(sample=sample, timestep=torch.tensor(981), encoder_hidden_states=text)
        remove()
        x, out = seen[0]
        # nearest-exact from 13 to 6 rows: source row floor((i + 0.5) * 13 / 6); columns alike.
        rows, cols = (((torch.arange(n) + 0.5) * side / n).floor().long() for n, side in ((6, 13), (7, 15)))
        expected = reference_attention(attn, x, grid_of(x, 13, 15)[..., rows[:, None], cols])
    assert out.shape == x.shape == (2, 13 * 15, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def unet_inputs(kind: str) -> dict:
    torch.manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 4, 16, 12),
        "encoder_hidden_states": torch.randn(2, 77, 2 * TEXT_DIM if kind == "sdxl" else TEXT_DIM),
    }
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, TEXT_DIM), "time_ids": torch.randn(2, 6)}
    return inputs


def todo_layers(unet) -> dict[str, tuple[int, float]]:
    """The attention layers carrying ToDo: name -> (downsample, factor)."""
    return {
        name: (module.processor.downsample, module.processor.factor)
        for name, module in unet.named_modules()
        if isinstance(getattr(module, "processor", None), todo.ToDoAttnProcessor)
    }


@pytest.mark.parametrize(
    "kind, options, expected",
    [
        ("sd1", m.MethodOptions(), {"down_blocks.0": (1, 2.0), "up_blocks.1": (1, 2.0)}),
        # The tiny SDXL has two levels, so its mid block is at downsample 2 too (SDXL's is at 4).
        ("sdxl", m.MethodOptions(), {"down_blocks.1": (2, 2.0), "mid_block": (2, 2.0), "up_blocks.0": (2, 2.0)}),
        (
            "sd1",
            m.MethodOptions(todo_max_depth=2, todo_factor=3.0, todo_factor_2=1.5),
            {"down_blocks.0": (1, 3.0), "mid_block": (2, 1.5), "up_blocks.1": (1, 3.0)},
        ),
    ],
)
def test_the_registry_patches_attn1_at_the_top_attention_levels_and_removes_exactly(kind, options, expected):
    """SDXL has no attention at the latent's resolution: ToDo goes one level down, as tomesd and AgentSD do."""
    unet = tiny_unet(kind).eval()
    inputs = unet_inputs(kind)
    processors = dict(unet.attn_processors)
    state = [(obj, sorted(vars(obj))) for obj in unet.modules()]
    with torch.no_grad():
        base = unet(timestep=981, **inputs).sample
        with m.METHODS["todo"].applied(unet, options=options):
            layers = todo_layers(unet)
            patched = unet(timestep=981, **inputs).sample
        after = unet(timestep=981, **inputs).sample
    assert {name.rsplit(".attentions", 1)[0] for name in layers} == set(expected)
    assert all(
        name.endswith("attn1") and (downsample, factor) == expected[name.rsplit(".attentions", 1)[0]]
        for name, (downsample, factor) in layers.items()
    )
    assert not torch.equal(patched, base)
    assert torch.equal(after, base)
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
    assert [(obj, sorted(vars(obj))) for obj in unet.modules()] == state


def test_it_turns_off_after_its_step_fraction():
    """--todo-stop-after 0.5: on while t >= 500 of the scheduler's 1000 training timesteps, then the plain UNet."""
    unet, inputs = tiny_unet("sd1").eval(), unet_inputs("sd1")
    with torch.no_grad():
        base = {t: unet(timestep=t, **inputs).sample for t in (981, 500, 499, 1)}
        with m.METHODS["todo"].applied(unet, options=m.MethodOptions(todo_stop_after=0.5)):
            patched = {t: unet(timestep=t, **inputs).sample for t in base}
    assert [torch.equal(patched[t], base[t]) for t in base] == [False, False, True, True]


def test_factor_one_is_the_unpatched_model_bit_for_bit():
    unet, inputs = tiny_unet("sd1").eval(), unet_inputs("sd1")
    with torch.no_grad():
        base = unet(timestep=981, **inputs).sample
        with m.METHODS["todo"].applied(unet, options=m.MethodOptions(todo_factor=1.0)):
            assert todo_layers(unet)
            assert torch.equal(unet(timestep=981, **inputs).sample, base)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"todo_factor": 0.5}, "--todo-factor: must be >= 1, got 0.5"),
        ({"todo_factor_2": 0}, "--todo-factor-2: must be >= 1, got 0"),
        ({"todo_max_depth": 3}, r"--todo-max-depth: must be in \[1, 2\], got 3"),
        ({"todo_stop_after": 1.5}, r"--todo-stop-after: must be in \[0, 1\], got 1.5"),
        (
            {"todo_mode": "linear"},
            "--todo-mode: choose from nearest-exact, nearest, bilinear, bicubic, area; got 'linear'",
        ),
        ({"todo_max_depth": 1.5}, "--todo-max-depth: expected int, got 1.5"),
    ],
)
def test_bad_knobs_are_refused_naming_the_flag_and_the_accepted_values(knobs, message):
    with pytest.raises(ValueError, match=message):
        m.MethodOptions(**knobs)


def test_applying_twice_is_refused_and_changes_nothing():
    unet = tiny_unet("sd1")
    with m.METHODS["todo"].applied(unet):
        processors = dict(unet.attn_processors)
        with pytest.raises(ValueError, match="already carries ToDo"):
            todo.apply_todo(unet, {1: 2.0})
        assert unet.attn_processors == processors


def test_on_at_every_step_it_compiles_whole_with_fullgraph_and_matches_eager():
    """The default (no stop fraction) never reads the timestep, so the patched UNet is one graph."""
    torch._dynamo.reset()
    unet, inputs = tiny_unet("sd1").eval(), unet_inputs("sd1")
    with torch.no_grad(), m.METHODS["todo"].applied(unet):
        eager = unet(timestep=981, **inputs).sample
        compiled = torch.compile(unet, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(timestep=981, **inputs).sample, eager, atol=1e-5)
    torch._dynamo.reset()
