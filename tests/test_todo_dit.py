"""ToDo on diffusion transformers (eval/todo_dit.py), on the tiny SD3, Flux and PixArt of eval/transformer_configs.py.

A joint attention layer with ToDo must compute what the layer's own processor computes when the image
keys and values that downsampling drops are masked out (``nearest`` keeps tokens (2i, 2j) of the grid,
so the two agree; the text keys stay, and the rotary embedding of the kept keys is their own). Plain
self-attention layers (PixArt's ``attn1``, SD3.5's ``attn2``) get the UNet's processor; the whole
model changes, and comes back bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import methods as m  # noqa: E402
import todo  # noqa: E402
import todo_dit  # noqa: E402
from tiny import tiny_unet  # noqa: E402
from transformer_configs import TRANSFORMER_ARCHS  # noqa: E402

import agentsd  # noqa: E402

GRID = (6, 10)  # not square: rows and columns must not be swapped
TEXTS = 5


def tiny(name: str) -> torch.nn.Module:
    return TRANSFORMER_ARCHS[name].build(seed=0)


def inputs(name: str, model: torch.nn.Module, resolution: int = 64) -> dict:
    return TRANSFORMER_ARCHS[name].inputs(model, 1, resolution, 981, torch.Generator().manual_seed(0))


def kept_keys_mask(text_first: bool) -> torch.Tensor:
    """Keys attended to with ``nearest`` downsampling by 2: every text token and image tokens (2i, 2j)."""
    image = torch.zeros(GRID, dtype=torch.bool)
    image[::2, ::2] = True
    text = torch.ones(TEXTS, dtype=torch.bool)
    return torch.cat([text, image.flatten()] if text_first else [image.flatten(), text])[None, None, None]


def flux_rope(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding of TEXTS text tokens and the GRID's image tokens, as Flux builds it."""
    ids = torch.zeros(*GRID, 3)
    ids[..., 1] += torch.arange(GRID[0])[:, None]
    ids[..., 2] += torch.arange(GRID[1])[None, :]
    return model.pos_embed(torch.cat([torch.zeros(TEXTS, 3), ids.reshape(-1, 3)]))


@pytest.mark.parametrize(
    "name, path",
    [
        ("tiny-sd3", "transformer_blocks.0"),  # joint, with dual attention
        ("tiny-sd3", "transformer_blocks.1"),  # the last block: context-pre-only (no text output projection)
        ("tiny-flux", "transformer_blocks.0"),  # double stream, text first, rotary embedding
        ("tiny-flux", "single_transformer_blocks.0"),  # one sequence, text first, no output projection
    ],
)
def test_joint_attention_is_the_layers_own_with_the_dropped_image_keys_masked(name, path, monkeypatch):
    model = tiny(name)
    attn = model.get_submodule(path).attn
    width = attn.to_q.in_features
    generator = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, GRID[0] * GRID[1], width, generator=generator), torch.randn(2, TEXTS, width)
    text_first = name == "tiny-flux"
    single = path.startswith("single")
    call = {"hidden_states": torch.cat([text, image], 1), "encoder_hidden_states": None} if single else {}
    call = call or {"hidden_states": image, "encoder_hidden_states": text}
    if text_first:
        call["image_rotary_emb"] = flux_rope(model)
    state = todo.ToDoState(size=GRID, mode="nearest")  # the token grid itself: downsample 1
    processor = todo_dit.ToDoJointProcessor(state, 1, 2.0, text_first, attn.processor)
    with torch.no_grad():
        ours = processor(attn, **call)
        # The layer's own processor with the dropped keys masked: SDPA is where both processors attend.
        sdpa, mask = F.scaled_dot_product_attention, kept_keys_mask(text_first)
        monkeypatch.setattr(
            F, "scaled_dot_product_attention", lambda *args, **kw: sdpa(*args, **{**kw, "attn_mask": mask})
        )
        reference = attn.processor(attn, **call)
    for got, want in zip(
        ours if isinstance(ours, tuple) else (ours,), reference if isinstance(reference, tuple) else (reference,)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_the_registry_patches_every_image_attention_and_removes_exactly(name):
    model = tiny(name)
    call = inputs(name, model)
    layers = [layer for site in agentsd.select_blocks(model) for layer in todo.image_attentions(site.module)]
    originals = [attn.processor for attn, _ in layers]
    with torch.inference_mode():
        base = model(**call).sample
        with m.METHODS["todo"].applied(model) as generate:
            kinds = [type(attn.processor) for attn, _ in layers]
            out = generate(**call).sample
        again = model(**call).sample
    expected = [todo_dit.ToDoJointProcessor if joint else todo.ToDoAttnProcessor for _, joint in layers]
    assert kinds == expected
    assert out.shape == base.shape and not torch.allclose(out, base)
    assert torch.equal(again, base)
    assert [attn.processor for attn, _ in layers] == originals
    assert not hasattr(model, "_diffusers_hook") and "forward" not in vars(model)


def test_a_grid_it_does_not_shrink_is_the_unpatched_model_bit_for_bit():
    model = tiny("tiny-flux")
    call = inputs("tiny-flux", model)
    with torch.inference_mode():
        base = model(**call).sample
        remove = todo_dit.apply_todo_dit(model, 1.0)
        out = model(**call).sample
        remove()
    assert torch.equal(out, base)


def test_flux_noise_level_is_its_timestep():
    """Flux's pipeline passes t / 1000: a stop fraction of 0.5 keeps ToDo on at 0.981, off at 0.3."""
    model = tiny("tiny-flux")
    call = inputs("tiny-flux", model)
    remove = todo_dit.apply_todo_dit(model, 2.0, stop_after=0.5)
    state = model._diffusers_hook.get_hook(todo.HOOK_NAME).state
    with torch.inference_mode():
        model(**call)
        assert state.active and state.size == (4, 4)
        model(**{**call, "timestep": torch.tensor([0.3])})
        assert not state.active
    remove()


def test_twice_is_refused_and_other_models_by_name():
    model = tiny("tiny-pixart")
    remove = todo_dit.apply_todo_dit(model, 2.0)
    with pytest.raises(ValueError, match="already carries ToDo"):
        todo_dit.apply_todo_dit(model, 2.0)
    remove()
    with pytest.raises(TypeError, match="needs SD3, Flux or PixArt, got UNet2DConditionModel"):
        todo_dit.apply_todo_dit(tiny_unet("sd1"), 2.0)
