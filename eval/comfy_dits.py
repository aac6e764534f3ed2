"""ComfyUI's SD3 / SD3.5 and Flux models with random weights, and their diffusers twins.

The weights are drawn for a diffusers transformer and given to ComfyUI through ComfyUI's own
diffusers-to-ComfyUI key map (``comfy.model_detection.convert_diffusers_mmdit``), so the two engines
hold the same weights. SD3 goes through ComfyUI's loader, which detects it from its weights at any
size. ComfyUI's Flux detection fixes the width (24 heads of 128), so a narrower Flux (``tiny``) is
built from ComfyUI's own Flux schnell configuration instead, as its loader would build it.

Layouts: ``tiny`` for tests (milliseconds a call); ``full``, for speed: SD3.5 Medium itself, and Flux at
full width with fewer blocks (``double``, ``single``).
"""

from __future__ import annotations

from typing import Any

import torch

#: Text tokens of the test conditioning.
TEXT_TOKENS = 8


def sd3_config(layout: str) -> dict[str, Any]:
    """Constructor arguments of diffusers' ``SD3Transformer2DModel``, SD3.5-shaped (qk-norm, the second,
    image-only attention in the first blocks): ``tiny`` (2 blocks of 2 heads of 64, the first with the
    second attention) or SD3.5 Medium's own (24 blocks of 24 heads, the second attention in blocks 0-12).

    ComfyUI reads an MMDiT's depth from its width (64 per head) and takes its last block as the one whose
    text stream ends early (``context_pre_only``), so its key map only loads an MMDiT with as many blocks
    as heads: no full-width SD3 with fewer blocks.
    """
    heads = 2 if layout == "tiny" else 24
    return dict(
        sample_size=32 if layout == "tiny" else 128,
        patch_size=2,
        in_channels=16,
        num_layers=heads,
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=64 if layout == "tiny" else 4096,
        caption_projection_dim=64 * heads,
        pooled_projection_dim=32 if layout == "tiny" else 2048,
        out_channels=16,
        pos_embed_max_size=32 if layout == "tiny" else 384,
        dual_attention_layers=(0,) if layout == "tiny" else tuple(range(13)),
        qk_norm="rms_norm",
    )


def flux_config(layout: str, double: int = 1, single: int = 1) -> dict[str, Any]:
    """Constructor arguments of diffusers' ``FluxTransformer2DModel`` (schnell: no guidance embedding)."""
    tiny = layout == "tiny"
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=64 if tiny else 128,
        num_attention_heads=2 if tiny else 24,
        joint_attention_dim=32 if tiny else 4096,
        pooled_projection_dim=32 if tiny else 768,
        guidance_embeds=False,
        axes_dims_rope=(8, 28, 28) if tiny else (16, 56, 56),
    )


def _random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for ``model``'s state (std 1 / sqrt(fan-in); norms at 1 and biases near 0)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() == 1 and "norm" in name:
            weights[name] = torch.ones(tensor.shape)
        elif tensor.dim() > 1:
            weights[name] = torch.randn(tensor.shape, generator=generator) * tensor[0].numel() ** -0.5
        else:
            weights[name] = torch.randn(tensor.shape, generator=generator) * 0.02
    return weights


def random_dit(
    kind: str, layout: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **blocks: int
) -> tuple[Any, torch.nn.Module]:
    """(ComfyUI model, diffusers twin) of ``kind`` ``"sd3"`` or ``"flux"`` with the same seeded weights.

    ``blocks``: Flux's ``double=`` and ``single=``.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls, config = (
        (SD3Transformer2DModel, sd3_config(layout, **blocks))
        if kind == "sd3"
        else (
            FluxTransformer2DModel,
            flux_config(layout, **blocks),
        )
    )
    with torch.device("meta"):
        twin = cls(**config)
    weights = _random_weights(twin, seed)
    twin.load_state_dict(weights, assign=True)
    twin = twin.to(dtype).eval()
    # ComfyUI's conversion writes into the tensors it is given (it swaps scale and shift in place):
    # it gets copies, so that the twin keeps the diffusers layout.
    weights = {name: tensor.clone() for name, tensor in weights.items()}
    if kind == "sd3" or layout != "tiny":
        model = comfy.sd.load_diffusion_model_state_dict(weights, model_options={"dtype": dtype})
        return model, twin
    comfy_config = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": config["pooled_projection_dim"],
        "context_in_dim": config["joint_attention_dim"],
        "hidden_size": config["attention_head_dim"] * config["num_attention_heads"],
        "mlp_ratio": 4.0,
        "num_heads": config["num_attention_heads"],
        "depth": config["num_layers"],
        "depth_single_blocks": config["num_single_layers"],
        "axes_dim": list(config["axes_dims_rope"]),
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": False,
        "dtype": dtype,
    }
    base = comfy.supported_models.FluxSchnell(comfy_config).get_model({})
    base.diffusion_model.load_state_dict(comfy.model_detection.convert_diffusers_mmdit(weights, ""))
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu")), twin


def conditioning(model: Any, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (text context [B, T, width], pooled vector [B, width]) for ComfyUI ``model``."""
    generator = torch.Generator().manual_seed(seed)
    diffusion_model = model.model.diffusion_model
    if hasattr(diffusion_model, "txt_in"):
        width, pooled = diffusion_model.txt_in.in_features, diffusion_model.params.vec_in_dim
    else:
        width, pooled = diffusion_model.context_embedder.in_features, diffusion_model.y_embedder.mlp[0].in_features
    return torch.randn(batch, TEXT_TOKENS, width, generator=generator), torch.randn(batch, pooled, generator=generator)


def model_call(model: Any, x: torch.Tensor, sigma: float, context: torch.Tensor, pooled: torch.Tensor):
    """One call of ComfyUI ``model`` at ``sigma`` as its sampler makes it (``apply_model``, wrappers and
    patches included), ready to run; it returns the model's denoised estimate."""
    import comfy.patcher_extension
    from comfy_engine import load

    load(model)
    sigmas = torch.full((x.shape[0],), float(sigma), device=x.device)
    options = dict(model.model_options.get("transformer_options", {}))
    options |= {"sigmas": sigmas, "cond_or_uncond": [0, 1] * (x.shape[0] // 2) or [0]}
    # As ComfyUI's sampler hands them over: the model's wrappers, in its transformer options.
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(model.wrappers)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return model.model.apply_model(x, sigmas, c_crossattn=context, y=pooled, transformer_options=options)

    return call


def twin_call(
    twin: torch.nn.Module, kind: str, x: torch.Tensor, sigma: float, context: torch.Tensor, pooled: torch.Tensor
):
    """The same call of the diffusers twin, ready to run; it returns the denoised estimate ``x - sigma * v``."""
    batch, channels, h, w = x.shape
    sigmas = torch.full((batch,), float(sigma), device=x.device)
    if kind == "sd3":
        kwargs = dict(hidden_states=x, timestep=sigmas * 1000)
    else:
        packed = (
            x.view(batch, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * 4)
        )
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device)
        kwargs = dict(hidden_states=packed, timestep=sigmas, img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids)

    def call() -> torch.Tensor:
        with torch.no_grad():
            out = twin(encoder_hidden_states=context, pooled_projections=pooled, return_dict=False, **kwargs)[0]
        if kind == "flux":
            out = out.view(batch, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        return x - sigma * out

    return call


#: What the speed script times on a diffusion transformer: ComfyUI unpatched and the node in each of its
#: two phases, and the diffusers twin likewise (the same weights, so the two ratios compare).
DIT_METHODS = ("comfyui", "agentsd-agents", "agentsd-tome", "diffusers", "diffusers-agents", "diffusers-tome")

#: The sigma of each method's call: the recipe's agent phase covers sigma >= 0.6.
PHASE_SIGMAS = {"agents": 0.9, "tome": 0.3}


def dit_calls(kind: str, model: Any, twin: torch.nn.Module, x: torch.Tensor, ratio: float, methods: tuple[str, ...]):
    """Each method's call on latent ``x``, made on first use (loading a ComfyUI clone unloads the last one)."""
    import copy

    import agentsd
    from agentsd.comfy_patch import apply_agentsd

    context, pooled = conditioning(model, x.shape[0])
    context, pooled = context.to(x), pooled.to(x)
    patched = apply_agentsd(model, agentsd.AgentSDConfig(ratio=ratio)) if any("agents" in m for m in methods) else None
    patched_twin = None
    if any(m.startswith("diffusers-") for m in methods):
        patched_twin = copy.deepcopy(twin)
        agentsd.apply_patch(patched_twin, ratio=ratio)

    def make(method: str):
        engine, _, phase = method.partition("-")
        sigma = PHASE_SIGMAS.get(phase, PHASE_SIGMAS["agents"])
        if engine == "diffusers":
            return twin_call(patched_twin if phase else twin, kind, x, sigma, context, pooled)
        return model_call(patched if phase else model.clone(), x, sigma, context, pooled)

    return make
