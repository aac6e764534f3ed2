"""AgentSD beside diffusers' other switches: processors set after the patch, fused QKV, IP-Adapter,
LoRA, save_pretrained, and the warnings and errors a first-time user meets."""

import warnings

import pytest
import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor2_0,
    FusedAttnProcessor2_0,
)
from diffusers.models.embeddings import ImageProjection
from safetensors.torch import load_file
from tiny import TEXT_DIM, tiny_pipeline, tiny_unet

import agentsd


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g)


def _run(unet, sample, text, t=981, **kwargs):
    with torch.no_grad():
        return unet(sample, torch.tensor(t), encoder_hidden_states=text, **kwargs).sample


@pytest.mark.parametrize("replacement", [AttnProcessor, AttnProcessor2_0])
def test_processors_set_after_the_patch_are_used_and_reported_at_once(replacement):
    unet = tiny_unet("sd1").eval()
    sample, text = _inputs()
    plain = _run(unet, sample, text)
    agentsd.apply_patch(unet, ratio=0.5)
    patched = _run(unet, sample, text)
    unet.set_attn_processor(replacement())
    assert all(isinstance(p, replacement) for p in unet.attn_processors.values())  # no call needed first
    assert agentsd.is_patched(unet)
    assert torch.allclose(_run(unet, sample, text), patched, atol=1e-5)  # AgentSD still on
    agentsd.remove_patch(unet)
    assert all(isinstance(p, replacement) for p in unet.attn_processors.values())  # the user's choice stays
    assert torch.allclose(_run(unet, sample, text), plain, atol=1e-5)


def test_fused_qkv_before_or_after_the_patch():
    unet = tiny_unet("sd1").eval()
    sample, text = _inputs()
    agentsd.apply_patch(unet, ratio=0.5)
    patched = _run(unet, sample, text)
    unet.fuse_qkv_projections()  # after: replaces every processor with FusedAttnProcessor2_0
    assert torch.allclose(_run(unet, sample, text), patched, atol=1e-5)
    agentsd.remove_patch(unet)
    fused = _run(unet, sample, text)
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    agentsd.apply_patch(unet, ratio=0.5)  # before: the fused processor does the plain-ToMe calls
    assert torch.allclose(_run(unet, sample, text), patched, atol=1e-5)
    agentsd.remove_patch(unet)
    assert torch.equal(_run(unet, sample, text), fused)


def test_set_default_attn_processor_works_while_patched():
    unet = tiny_unet("sd1").eval()
    sample, text = _inputs()
    agentsd.apply_patch(unet, ratio=0.5)
    patched = _run(unet, sample, text)
    unet.set_attn_processor(AttnProcessor())
    unet.set_default_attn_processor()
    assert torch.allclose(_run(unet, sample, text), patched, atol=1e-5)
    agentsd.remove_patch(unet)


def _custom_diffusion_processors(unet, seed=0):
    """Custom Diffusion processors with weights on every attention layer (q/out on attn1, k/v too on attn2)."""
    torch.manual_seed(seed)
    processors = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        cross = attn.cross_attention_dim if name.endswith("attn2.processor") else None
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=cross is not None, train_q_out=True, hidden_size=attn.inner_dim, cross_attention_dim=cross
        )
        for parameter in processor.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
        processors[name] = processor
    return processors


def test_processors_with_weights_keep_their_weights_visible_while_patched(tmp_path):
    """Custom Diffusion's processors are modules: state_dict, save_attn_procs, .to() and dtype casts
    must see them (diffusers' test_custom_diffusion_save_load), and they keep taking part."""
    unet = tiny_unet("sd1").eval()
    sample, text = _inputs()
    unet.set_attn_processor(_custom_diffusion_processors(unet))
    keys, parameters = set(unet.state_dict()), sum(p.numel() for p in unet.parameters())
    custom = _run(unet, sample, text)
    agentsd.apply_patch(unet, ratio=0.5)
    patched = _run(unet, sample, text)
    assert set(unet.state_dict()) == keys and sum(p.numel() for p in unet.parameters()) == parameters
    assert all(isinstance(p, CustomDiffusionAttnProcessor2_0) for p in unet.attn_processors.values())
    assert not torch.allclose(patched, custom, atol=1e-4)  # merged...
    plain = tiny_unet("sd1").eval()
    agentsd.apply_patch(plain, ratio=0.5)
    assert not torch.allclose(patched, _run(plain, sample, text), atol=1e-4)  # ...and the weights still act
    unet.save_attn_procs(tmp_path, weight_name="custom.safetensors")
    saved = load_file(tmp_path / "custom.safetensors")
    assert len(saved) == sum(len(list(p.parameters())) for p in unet.attn_processors.values())
    unet.to(torch.float64)
    assert all(
        p.dtype == torch.float64
        for p in unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"].parameters()
    )
    assert torch.allclose(_run(unet, sample.double(), text.double()).float(), patched, atol=1e-4)
    agentsd.remove_patch(unet)
    unet.to(torch.float32)
    assert torch.allclose(_run(unet, sample, text), custom, atol=1e-5)


def _ip_adapter_state_dict(unet, image_dim=16, seed=0):
    """A random IP-Adapter (the plain kind: 4 image tokens) shaped for ``unet``."""
    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    projection = ImageProjection(cross_attention_dim=cross, image_embed_dim=image_dim, num_image_text_embeds=4)
    layers = {}
    key_id = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            layers[f"{key_id}.to_k_ip.weight"] = torch.randn(module.inner_dim, cross) * 0.1
            layers[f"{key_id}.to_v_ip.weight"] = torch.randn(module.inner_dim, cross) * 0.1
            key_id += 2
    # The released checkpoints name the projection `proj`, as the loader expects.
    image_proj = {name.replace("image_embeds", "proj"): value for name, value in projection.state_dict().items()}
    return {"image_proj": image_proj, "ip_adapter": layers}


def test_ip_adapter_loads_on_a_patched_unet_and_agentsd_stays_on():
    unet = tiny_unet("sd1").eval()
    sample, text = _inputs()
    image = {"image_embeds": [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))]}
    agentsd.apply_patch(unet, ratio=0.5)
    unet._load_ip_adapter_weights([_ip_adapter_state_dict(unet)])  # what pipe.load_ip_adapter calls
    with_agents = _run(unet, sample, text, added_cond_kwargs=image)
    assert agentsd.is_patched(unet)
    assert sum(type(p).__name__.startswith("IPAdapter") for p in unet.attn_processors.values()) == 4  # every attn2
    agentsd.remove_patch(unet)
    without = _run(unet, sample, text, added_cond_kwargs=image)
    assert not torch.allclose(with_agents, without, atol=1e-4)
    agentsd.apply_patch(unet, ratio=0.5)  # IP-Adapter first, then the patch: the same output
    assert torch.allclose(_run(unet, sample, text, added_cond_kwargs=image), with_agents, atol=1e-5)
    agentsd.remove_patch(unet)


def test_lora_added_to_a_patched_unet():
    pytest.importorskip("peft")
    from peft import LoraConfig

    unet = tiny_unet("sd1").eval()
    sample, text = _inputs()
    agentsd.apply_patch(unet, ratio=0.5)
    patched = _run(unet, sample, text)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    with_lora = _run(unet, sample, text)
    assert not torch.allclose(with_lora, patched, atol=1e-4)  # the adapter acts on the agent path too
    agentsd.remove_patch(unet)
    lora_only = _run(unet, sample, text)
    agentsd.apply_patch(unet, ratio=0.5)
    assert torch.equal(_run(unet, sample, text), with_lora)
    agentsd.remove_patch(unet)
    assert torch.equal(_run(unet, sample, text), lora_only)


def test_save_pretrained_of_a_patched_pipeline_loads_unpatched_with_the_same_weights(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_pipeline("sd", tmp_path / "parts")
    agentsd.apply_patch(pipe, ratio=0.5)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert not agentsd.is_patched(loaded)
    assert all(
        type(p) is type(q) for p, q in zip(loaded.unet.attn_processors.values(), pipe.unet.attn_processors.values())
    )
    ours, theirs = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    agentsd.remove_patch(pipe)


def test_a_patch_that_patches_nothing_says_why():
    sdxl = tiny_unet("sdxl")
    with pytest.warns(UserWarning, match=r"none of the 8 .*max_downsample=1 .*downsample 2"):
        agentsd.apply_patch(sdxl, max_downsample=1)
    agentsd.remove_patch(sdxl)
    with pytest.warns(UserWarning, match="merge_attn, merge_crossattn and merge_mlp are all False"):
        agentsd.apply_patch(sdxl, merge_attn=False)
    agentsd.remove_patch(sdxl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agentsd.apply_patch(sdxl)  # the default level patches: no warning
    agentsd.remove_patch(sdxl)


def test_transformer_blocks_of_other_kinds_are_named():
    from diffusers.models.attention import BasicTransformerBlock

    class TemporalTransformerBlock(torch.nn.Module):
        pass

    unet = tiny_unet("sd1")
    unet.mid_block.add_module("motion", TemporalTransformerBlock())
    with pytest.warns(UserWarning, match="TemporalTransformerBlock blocks stay unpatched"):
        agentsd.apply_patch(unet)
    agentsd.remove_patch(unet)

    for module in list(unet.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BasicTransformerBlock):
                module.add_module(name, TemporalTransformerBlock())
    with pytest.raises(ValueError, match="no BasicTransformerBlock to patch; its transformer blocks are Temporal"):
        agentsd.apply_patch(unet)


def test_unsupported_transformers_are_refused_by_name():
    from diffusers import DiTTransformer2DModel

    class DiTPipelineStandIn:
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8, patch_size=2
        )

    for model in (DiTPipelineStandIn(), DiTPipelineStandIn.transformer):
        with pytest.raises(TypeError, match=r"DiTTransformer2DModel is not a model AgentSD patches.*Supported: .*SD3"):
            agentsd.apply_patch(model)


def test_summary_shows_the_settings_in_force():
    unet = tiny_unet("sd1")
    agentsd.apply_patch(unet, ratio=0.4)
    at_04 = str(agentsd.patch_summary(unet))
    agentsd.apply_patch(unet, ratio=0.5)
    at_05 = str(agentsd.patch_summary(unet))
    agentsd.apply_patch(unet, schedule="fixed", ratio=0.3, sx=4, sy=4, agent_ratio=0.9)
    fixed = str(agentsd.patch_summary(unet))
    custom = [
        agentsd.Phase(ratio=0.5, agent_ratio=0.95, sx=4, sy=4, min_t=0.9),
        agentsd.Phase(ratio=0.3, agent_ratio=0.0),
    ]
    agentsd.apply_patch(unet, schedule=custom)
    custom_lines = str(agentsd.patch_summary(unet)).splitlines()
    agentsd.remove_patch(unet)
    assert at_04 != at_05
    assert "ratio 0.5" in at_05 and "t >= 600: agent attention (agent_ratio 0.95), ratio 0.5, sx=sy=4" in at_05
    assert "t < 600: ToMe, ratio 0.5, sx=sy=2" in at_05
    assert (
        "schedule 'fixed', ratio 0.3" in fixed and "every step: agent attention (agent_ratio 0.9), ratio 0.3" in fixed
    )
    # A custom schedule's header names no ratio of its own (config.ratio is ignored): each phase states its own.
    assert "schedule custom, merging in self-attention" in custom_lines[1] and "ratio" not in custom_lines[1]
    assert custom_lines[2:] == [
        "  t >= 900: agent attention (agent_ratio 0.95), ratio 0.5, sx=sy=4",
        "  t < 900: ToMe, ratio 0.3, sx=sy=2",
    ]
