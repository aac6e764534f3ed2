"""The paths diffusers users take next: training with checkpointing, copies, PAG, every scheduler,
the x4 upscaler's cross-only blocks, AnimateDiff; and the summary saying what ran."""

import copy
import functools
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from diffusers import (
    AnimateDiffPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    MotionAdapter,
    PNDMScheduler,
    StableDiffusionPAGPipeline,
    TCDScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from tiny import TEXT_DIM, tiny_pipeline, tiny_unet

import agentsd
from agentsd.schedule import SD_LOG_SIGMAS

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 5, TEXT_DIM, generator=g)


def _grads(unet, t, checkpointing):
    unet.zero_grad()
    if checkpointing is None:
        unet.disable_gradient_checkpointing()
    else:
        unet.enable_gradient_checkpointing(
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=checkpointing)
        )
    sample, text = _inputs()
    unet(sample, torch.tensor(t), encoder_hidden_states=text).sample.square().mean().backward()
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("t", [981, 301], ids=["agent-phase", "tome-phase"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, t):
    """The backward pass recomputes each checkpointed block after the call returned: it merges alike."""
    unet = tiny_unet("sd1").train()
    agentsd.apply_patch(unet, ratio=0.5)
    plain, checkpointed = _grads(unet, t, None), _grads(unet, t, use_reentrant)
    assert plain.keys() == checkpointed.keys()
    assert max((plain[name] - checkpointed[name]).abs().max().item() for name in plain) < 1e-6
    agentsd.remove_patch(unet)
    unpatched = _grads(unet, t, None)
    assert max((plain[name] - unpatched[name]).abs().max().item() for name in plain) > 1e-4  # it merged


def test_a_deep_copy_is_an_independent_patched_unet():
    unet = tiny_unet("sd1").eval()
    agentsd.apply_patch(unet, ratio=0.5)
    sample, text = _inputs()
    run = lambda model: model(sample, torch.tensor(981), encoder_hidden_states=text).sample  # noqa: E731
    with torch.no_grad():
        before = run(unet)
        twin = copy.deepcopy(unet)
        name = agentsd.select_blocks(unet)[0].name
        assert twin.get_submodule(name).forward is not unet.get_submodule(name).forward
        assert torch.equal(run(twin), before)
        for p in unet.parameters():
            p.mul_(0.5)
        assert torch.equal(run(twin), before)  # the copy runs its own weights and state
        assert agentsd.is_patched(twin) and str(agentsd.patch_summary(twin)).startswith("AgentSD patched 3")
        agentsd.remove_patch(twin)
        reference = copy.deepcopy(twin)
    assert not agentsd.is_patched(twin) and "forward" not in twin.__dict__
    assert all("forward" not in module.__dict__ for module in twin.modules())
    assert isinstance(reference, UNet2DConditionModel)


def test_pickling_a_patched_unet_is_refused_with_what_to_do(tmp_path):
    unet = tiny_unet("sd1")
    agentsd.apply_patch(unet)
    with pytest.raises(TypeError, match=r"remove_patch\(unet\) before saving"):
        torch.save(unet, tmp_path / "unet.pt")
    torch.save(unet.state_dict(), tmp_path / "weights.pt")  # the usual way still works
    agentsd.remove_patch(unet)
    torch.save(unet, tmp_path / "unet.pt")


def test_pag_perturbs_through_its_own_processor_in_the_agent_phase(tmp_path):
    """PAG's processor is no plain softmax attention: it is called (on merged tokens), never stood in for."""
    sd = tiny_pipeline("sd", tmp_path)
    pipe = StableDiffusionPAGPipeline(**sd.components, pag_applied_layers=["down_blocks.0"])
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply_patch(pipe, ratio=0.5, schedule="fixed", agent_ratio=0.95, sx=4, sy=4)

    def images(pag_scale):
        generator = torch.Generator().manual_seed(0)
        kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np", generator=generator)
        return pipe("a photo of a cat", pag_scale=pag_scale, **kwargs).images

    without = images(0.0)
    assert np.abs(images(3.0) - without).max() > 0.05
    lines = str(agentsd.patch_summary(pipe))  # at the last call, with PAG's processors in place
    assert "ToMe in 1 block through PAGCFGIdentitySelfAttnProcessor2_0" in lines
    assert "agent attention in 2 blocks" in lines


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_BETAS),
    "ddim-trailing": lambda: DDIMScheduler(**SD_BETAS, timestep_spacing="trailing"),
    "pndm": lambda: PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1),
    "lms": lambda: LMSDiscreteScheduler(**SD_BETAS),
    "euler": lambda: EulerDiscreteScheduler(**SD_BETAS),
    "euler-karras": lambda: EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True),
    "euler-leading": lambda: EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
    "euler-ancestral": lambda: EulerAncestralDiscreteScheduler(**SD_BETAS),
    "heun": lambda: HeunDiscreteScheduler(**SD_BETAS),
    "dpm++2m": lambda: DPMSolverMultistepScheduler(**SD_BETAS),
    "dpm++2m-karras": lambda: DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True),
    "dpm++2m-sde": lambda: DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++"),
    "unipc": lambda: UniPCMultistepScheduler(**SD_BETAS),
    "deis": lambda: DEISMultistepScheduler(**SD_BETAS),
    "lcm": lambda: LCMScheduler(**SD_BETAS),
    "tcd": lambda: TCDScheduler(**SD_BETAS),
    "ddpm": lambda: DDPMScheduler(**SD_BETAS),
    "kdpm2": lambda: KDPM2DiscreteScheduler(**SD_BETAS),
    "edm-euler": lambda: EDMEulerScheduler(),
    "edm-dpm": lambda: EDMDPMSolverMultistepScheduler(),
}


def _sigma(scheduler, t):
    """The noise-to-signal ratio of a UNet call at timestep ``t`` under ``scheduler``."""
    if type(scheduler).__name__.startswith("EDM"):
        return math.exp(4 * t)
    alphas = scheduler.alphas_cumprod.double()
    log_sigmas = (0.5 * ((1 - alphas) / alphas).log()).tolist()
    low = min(int(t), len(log_sigmas) - 2)
    return math.exp(log_sigmas[low] + (t - low) * (log_sigmas[low + 1] - log_sigmas[low]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_agent_phase_covers_the_same_noise_levels_with_every_scheduler(name, tmp_path):
    pipe = tiny_pipeline("sd", tmp_path)
    pipe.scheduler = SCHEDULERS[name]()
    agentsd.apply_patch(pipe, ratio=0.5)
    seen = []

    def record(pipe, step, t, kwargs):
        ran = agentsd.patch_summary(pipe).blocks[0].ran()
        seen.append((float(t), ran.agents))
        return kwargs

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="agentsd")  # a known scheduler: no word about its unit
        pipe("a cat", num_inference_steps=8, height=32, width=32, output_type="np", callback_on_step_end=record)
    threshold = math.exp(SD_LOG_SIGMAS[600])
    for t, agents in seen:
        assert agents == (_sigma(pipe.scheduler, t) >= threshold * (1 - 1e-4)), (t, agents)
    assert any(agents for _, agents in seen) and not all(agents for _, agents in seen)
    summary = str(agentsd.patch_summary(pipe))
    assert f"{type(pipe.scheduler).__name__}, " in summary and " steps: 0-" in summary


def test_an_unknown_scheduler_is_named_once(tmp_path):
    class OwnScheduler(DDIMScheduler):
        pass

    pipe = tiny_pipeline("sd", tmp_path)
    pipe.scheduler = OwnScheduler(**SD_BETAS)
    with pytest.warns(UserWarning, match="does not know the timestep unit of OwnScheduler") as caught:
        agentsd.apply_patch(pipe)
        pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="np")
    assert sum("OwnScheduler" in str(w.message) for w in caught) == 1


def test_blocks_without_self_attention_run_tome_and_say_so():
    """The x4 upscaler's blocks (only_cross_attention): attn1 attends to the text, so no agents."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        only_cross_attention=True,
    ).eval()
    agentsd.apply_patch(unet, ratio=0.5)
    sample, text = _inputs()
    with torch.no_grad():
        unet(sample, torch.tensor(981), encoder_hidden_states=text)
    summary = agentsd.patch_summary(unet)
    assert not any(block.ran().agents for block in summary.blocks)
    assert all(block.ran().merged for block in summary.blocks)
    assert "3 of the 3 blocks have no self-attention" in str(summary)


def test_animatediff_patches_the_spatial_blocks_only_and_removes_exactly(tmp_path):
    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )
    sd = tiny_pipeline("sd", tmp_path)
    pipe = AnimateDiffPipeline(
        unet=sd.unet,
        motion_adapter=adapter,
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        scheduler=DDIMScheduler(**SD_BETAS, clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)

    def frames():
        generator = torch.Generator().manual_seed(0)
        kwargs = dict(num_frames=4, num_inference_steps=2, height=32, width=32, output_type="np")
        return pipe("a photo of a cat", generator=generator, **kwargs).frames

    unpatched = frames()
    agentsd.apply_patch(pipe, ratio=0.5)
    names = [block.name for block in agentsd.patch_summary(pipe).blocks]
    assert names and not any("motion_modules" in name for name in names)
    merged = frames()
    assert np.isfinite(merged).all() and np.abs(merged - unpatched).max() > 0
    summary = agentsd.patch_summary(pipe)
    assert {block.tokens_seen for block in summary.blocks} == {256}  # one frame's pixels, never frames
    agentsd.remove_patch(pipe)
    assert np.array_equal(frames(), unpatched)


def test_ratio_zero_claims_no_agent_attention():
    unet = tiny_unet("sd1")
    agentsd.apply_patch(unet, ratio=0.0)
    assert "agent attention" not in str(agentsd.patch_summary(unet))


def test_each_step_is_logged_at_debug(caplog):
    unet = tiny_unet("sd1").eval()
    agentsd.apply_patch(unet)
    sample, text = _inputs()
    with caplog.at_level(logging.DEBUG, logger="agentsd"), torch.no_grad():
        unet(sample, torch.tensor(981), encoder_hidden_states=text)
    assert "timestep 981, noise level 0.981: phase 0, agent attention" in caplog.text


def test_numpy_knobs_and_bad_values_named():
    config = agentsd.AgentSDConfig(ratio=np.float64(0.4), schedule="fixed", sx=np.int64(2), seed=np.int64(1))
    assert type(config.sx) is int and type(config.phases[0].sx) is int
    with pytest.raises(ValueError, match="sx must be an integer >= 1, got 0"):
        agentsd.AgentSDConfig(sx=0)


def test_is_patched_is_false_for_models_without_a_unet(tmp_path):
    pipe = tiny_pipeline("controlnet", tmp_path)
    agentsd.apply_patch(pipe)
    assert agentsd.is_patched(pipe) and agentsd.is_patched(pipe.unet)
    assert not agentsd.is_patched(pipe.vae) and not agentsd.is_patched(pipe.controlnet)


def test_patched_context_removes_on_exit_errors_included_and_restores_a_previous_patch():
    unet = tiny_unet("sd1")
    with agentsd.patched(unet, ratio=0.3) as model:
        assert model is unet and agentsd.patch_summary(unet).config.ratio == 0.3
    assert not agentsd.is_patched(unet)
    with pytest.raises(RuntimeError, match="inside"), agentsd.patched(unet):
        raise RuntimeError("inside")
    assert not agentsd.is_patched(unet)
    agentsd.apply_patch(unet, ratio=0.5)
    with agentsd.patched(unet, ratio=0.2):
        assert agentsd.patch_summary(unet).config.ratio == 0.2
    assert agentsd.patch_summary(unet).config.ratio == 0.5
