"""AgentSD on the diffusion transformers of SD3 / SD3.5, Flux and PixArt, as diffusers users run them:
every pipeline variant, every flow-matching scheduler, block choice, LoRA, offloading, checkpointing,
copies and refusals. (Exactness against the design note: tests/test_dit_reference.py; compilation:
tests/test_compile_dit.py.)"""

import copy
import functools
import warnings

import pytest
import torch
import torch.utils.checkpoint
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SanaTransformer2DModel,
    UniPCMultistepScheduler,
)
from tiny_dit import DIT_PIPELINES, TINY_DITS, dit_inputs, pipeline_inputs, tiny_dit_pipeline, tiny_flux, tiny_sd3

import agentsd
from agentsd.config import RECIPE_SWITCH


def _forward(model, kind, t, **options):
    with torch.no_grad():
        return model(**dit_inputs(kind, t, **options))[0]


@pytest.mark.parametrize("kind", DIT_PIPELINES)
def test_every_pipeline_generates_with_both_phases_and_removal_gives_it_back(kind):
    pipe = tiny_dit_pipeline(kind)
    before = pipe(**pipeline_inputs(kind)).images
    agentsd.apply_patch(pipe, ratio=0.4)
    patched = pipe(**pipeline_inputs(kind)).images
    summary = agentsd.patch_summary(pipe)
    assert agentsd.is_patched(pipe) and agentsd.is_patched(pipe.transformer)
    assert {phase for *_, phase in summary.steps} == {0, 1}, summary.steps  # both phases, in order
    assert [phase for *_, phase in summary.steps] == [0, 1]
    assert all(block.ran().merged for block in summary.blocks)
    assert summary.model == type(pipe.transformer).__name__
    assert not torch.equal(patched, before)
    agentsd.remove_patch(pipe)
    assert not agentsd.is_patched(pipe)
    assert torch.equal(pipe(**pipeline_inputs(kind)).images, before)


def test_select_blocks_lists_every_block_and_blocks_chooses_them():
    flux = tiny_flux()
    names = [site.name for site in agentsd.select_blocks(flux)]
    assert names == ["transformer_blocks.0", "single_transformer_blocks.0"]
    agentsd.apply_patch(flux, blocks="single_transformer_blocks")
    assert [block.name for block in agentsd.patch_summary(flux).blocks] == ["single_transformer_blocks.0"]
    assert [site.name for site in agentsd.select_blocks(tiny_sd3(), blocks=["transformer_blocks.1"])] == [
        "transformer_blocks.1"
    ]


def test_unknown_block_names_are_refused_before_anything_changes():
    sd3 = tiny_sd3().eval()
    agentsd.apply_patch(sd3, ratio=0.3)
    before = _forward(sd3, "sd3", 999)
    with pytest.raises(ValueError, match=r"blocks names no block of this model: \['transformer_blocks.7'\]"):
        agentsd.apply_patch(sd3, ratio=0.5, blocks=["transformer_blocks.7"])
    with pytest.raises(ValueError, match="blocks must be None, a block name or a non-empty sequence"):
        agentsd.apply_patch(sd3, blocks=[])
    assert agentsd.patch_summary(sd3).config.ratio == 0.3
    assert torch.equal(_forward(sd3, "sd3", 999), before)


def test_other_transformers_are_refused_by_name_with_what_is_supported():
    torch.manual_seed(0)
    sana = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8,
    )  # fmt: skip

    class SanaPipelineStandIn:
        transformer = sana

    for model in (sana, SanaPipelineStandIn()):
        with pytest.raises(
            TypeError, match=r"SanaTransformer2DModel is not a model AgentSD patches: its attention is "
        ):
            agentsd.apply_patch(model)
        with pytest.raises(TypeError, match=r"Supported: .*SD3Transformer2DModel.*FluxTransformer2DModel"):
            agentsd.select_blocks(model)
    assert not agentsd.is_patched(sana)


SCHEDULERS = {
    "flow-euler-shift-3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "flow-heun": lambda: FlowMatchHeunDiscreteScheduler(shift=3.0),
    "dpm-solver-flow": lambda: DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    ),
    "unipc-flow": lambda: UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    ),
}


#: Flux's pipelines pass custom sigmas and a resolution-dependent shift ``mu``: Heun takes neither, and
#: DPM-Solver takes ``mu`` only with dynamic shifting.
FLUX_SCHEDULERS = {
    "dpm-solver-flow": lambda: DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    ),
    "unipc-flow": SCHEDULERS["unipc-flow"],
}


@pytest.mark.parametrize(
    ("kind", "scheduler"),
    [("sd3", name) for name in [*SCHEDULERS, "pipeline's own"]]
    + [("flux", name) for name in [*FLUX_SCHEDULERS, "pipeline's own"]],
)
def test_the_agent_phase_covers_sigma_from_0_6_with_every_flow_scheduler(kind, scheduler):
    """The noise level of a flow-matching model is sigma (Flux's transformer receives t / 1000): each
    transformer call runs the phase its sigma falls in, and the summary maps the steps alike."""
    pipe = tiny_dit_pipeline(kind)
    choices = FLUX_SCHEDULERS if kind == "flux" else SCHEDULERS
    if scheduler in choices:
        pipe.scheduler = choices[scheduler]()
    agentsd.apply_patch(pipe, ratio=0.4)
    seen = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        t = float(kwargs["timestep"].flatten()[0]) * (1000 if kind == "flux" else 1)
        seen.append((t / 1000, agentsd.patch_summary(pipe).blocks[0].ran().phase))
        return out

    pipe.transformer.forward = recording
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unknown timestep unit" warning
        pipe(**pipeline_inputs(kind, steps=6))
    del pipe.transformer.forward
    assert seen and all(phase == (0 if sigma >= RECIPE_SWITCH else 1) for sigma, phase in seen), seen
    assert {phase for _, phase in seen} == {0, 1}
    expected = [0 if t / 1000 >= RECIPE_SWITCH else 1 for t in pipe.scheduler.timesteps.tolist()]
    assert [phase for first, last, phase in agentsd.patch_summary(pipe).steps for _ in range(first, last + 1)] == (
        expected
    )


def test_flux_draws_random_destinations_at_batch_one_reproducibly():
    """Flux is guidance-distilled: a batch of one image is whole, so its destinations are random (by seed)."""
    flux = tiny_flux().eval()
    agentsd.apply_patch(flux, ratio=0.4, seed=0)
    first, again = _forward(flux, "flux", 999, batch=1), _forward(flux, "flux", 999, batch=1)
    agentsd.apply_patch(flux, ratio=0.4, seed=1)
    other_seed = _forward(flux, "flux", 999, batch=1)
    agentsd.apply_patch(flux, ratio=0.4, use_rand=False)
    fixed = _forward(flux, "flux", 999, batch=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, fixed)


def test_patched_context_on_a_pipeline():
    pipe = tiny_dit_pipeline("flux")
    with agentsd.patched(pipe, ratio=0.5):
        assert agentsd.patch_summary(pipe).config.ratio == 0.5
    assert not agentsd.is_patched(pipe)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_adapters_run_in_the_merged_projections(kind):
    """A PEFT adapter added after the patch acts in the projections agent attention computes: the
    output equals the patched model's with the adapter merged into the weights."""
    from peft import LoraConfig

    model = TINY_DITS[kind]().eval()
    agentsd.apply_patch(model, ratio=0.4)
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    with_adapter = {t: _forward(model, kind, t) for t in (999, 100)}
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    for t, expected in with_adapter.items():
        assert torch.allclose(_forward(model, kind, t), expected, atol=1e-5), t


@pytest.mark.parametrize("offload_first", [True, False])
def test_an_accelerate_offload_hook_keeps_working_around_the_patch(offload_first):
    from accelerate import cpu_offload_with_hook

    model = tiny_flux().eval()
    before = _forward(model, "flux", 999)
    if offload_first:
        cpu_offload_with_hook(model, execution_device="cpu")
    agentsd.apply_patch(model, ratio=0.4)
    if not offload_first:
        cpu_offload_with_hook(model, execution_device="cpu")
    assert not torch.equal(_forward(model, "flux", 999), before)
    agentsd.remove_patch(model)
    assert hasattr(model, "_hf_hook")
    assert torch.equal(_forward(model, "flux", 999), before)


def _grads(model, kind, t, checkpointing):
    model.train()
    model.zero_grad()
    if checkpointing:
        model.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))
    else:
        model.disable_gradient_checkpointing()
    model(**dit_inputs(kind, t))[0].square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model = TINY_DITS[kind]()
    agentsd.apply_patch(model, ratio=0.4)
    plain, checkpointed = _grads(model, kind, 999, False), _grads(model, kind, 999, True)
    assert plain.keys() == checkpointed.keys()
    assert max((plain[name] - checkpointed[name]).abs().max().item() for name in plain) < 1e-6


def test_a_deep_copy_is_an_independent_patched_transformer():
    model = tiny_sd3().eval()
    agentsd.apply_patch(model, ratio=0.4)
    expected = _forward(model, "sd3", 999)
    twin = copy.deepcopy(model)
    agentsd.remove_patch(model)
    assert agentsd.is_patched(twin)
    assert torch.equal(_forward(twin, "sd3", 999), expected)
    assert not torch.equal(_forward(model, "sd3", 999), expected)


def test_the_summary_names_what_ran_in_the_tome_phase():
    """SD3's ToMe phase runs the layer's own processor on merged tokens; Flux's runs agentsd's joint
    attention, since only it takes the merged tokens' rotary positions: the summary says which."""
    for kind, expected in (("sd3", "through JointAttnProcessor2_0"), ("flux", "through agentsd's joint attention")):
        model = TINY_DITS[kind]().eval()
        agentsd.apply_patch(model, ratio=0.4)
        _forward(model, kind, 100)
        assert expected in str(agentsd.patch_summary(model)), kind
