"""What eval/speed.py times, and what it expects each call to cost.

A :class:`Workload` is one call with its inputs already built: one UNet forward on random latents
and text embeddings (:func:`unet_workload`) or one diffusion transformer forward on the inputs its
pipeline gives it (:func:`transformer_workload`), a whole guided generation (:func:`pipeline_workload`)
or the hires fix's second pass (:func:`hires_workload`). Every input is seeded (:data:`SEED`), so
that every method gets the same ones.

A :class:`CostModel` says how one forward's time grows with the image (tokens and tokens squared),
scaled from reference forwards of this project's 2-core CPU (:data:`COST_MODELS`): the unit in
which the run's estimates count (:meth:`Workload.cost`, ``estimate.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from agentsd.config import RECIPE_SWITCH

import video  # isort: skip
from shared import dtype_kwarg  # isort: skip
from transformer_configs import TRANSFORMER_ARCHS, TransformerArch  # isort: skip
from unet_configs import ARCHS, TEXT_TOKENS, Arch  # isort: skip

if TYPE_CHECKING:
    from settings import PlannedRun, SpeedSettings

SEED = 0
#: Steps of a warm-up generation in pipeline mode: enough to run every code path of the loop once
#: (first step, cached steps, both recipe phases) at a fraction of a full generation's cost.
WARMUP_STEPS = 3
GUIDANCE_SCALE = 7.5
#: The hires fix's second pass (``--mode hires``): image-to-image at this strength from the first
#: pass's latent upscaled this many times (the common 512 -> 1024 px workflow at strength 0.4-0.6).
HIRES_STRENGTH = 0.5
HIRES_UPSCALE = 2
#: AgentSD's recipe picks its phase by noise level, not by step: its agent phase covers t >= 0.6 T.
HIRES_RECIPE_NOTE = (
    f"the pass starts at t = {HIRES_STRENGTH:g} T, below the recipe's agent phase (t >= {RECIPE_SWITCH:g} T): "
    "it runs the ToMe phase only"
)
PROMPT = "a high quality photograph of a corgi"


#: Runs one call of a workload: ``call(generate, warmup)``, ``generate`` being the method's.
WorkloadCall = Callable[[Callable[..., Any], bool], Any]


@dataclass(frozen=True)
class CostModel:
    """How one UNet forward's time grows with the image, for the run's estimates.

    A forward at ``resolution`` costs ``(1 - quadratic) p + quadratic p**2`` reference forwards,
    ``p`` being its pixels over the reference's: convolutions and projections grow with the tokens,
    attention with their square (the top level's self-attention above all).

    Attributes:
        pixels: Side of the reference forward (the architecture's first measured size).
        quadratic: The share of the reference forward that grows with the tokens squared.
        seconds: The reference forward (batch 2, float32) on this project's 2-core CPU, nothing else
            running, with 2 threads; ``None`` where not measured (no a-priori estimate then).
    """

    pixels: int
    quadratic: float
    seconds: float | None = None

    def units(self, resolution: int) -> float:
        """Reference forwards in one forward at ``resolution``."""
        pixels = (resolution / self.pixels) ** 2
        return (1 - self.quadratic) * pixels + self.quadratic * pixels**2


#: Threads of the reference forwards of :data:`COST_MODELS`.
REFERENCE_THREADS = 2
#: SD 1.5: fits its CPU forwards of 10.2, 28.4 and 68.4 s at 512, 768 and 1024 px (model: 1, 2.8, 6.4).
#: SDXL: 79.9 s at 1024 px (BENCHMARKS.md C); attention is 11.6% of its FLOPs there (SD 1.5 at 512
#: px: 16%, for 20% of the time), hence 0.15. Other UNets (tiny ones, SD 2.1, ``--model``) are
#: costed with SD 1.5's shape and get no a-priori seconds: their first call sets the pace.
COST_MODELS: dict[str, CostModel] = {"sd15": CostModel(512, 0.2, 10.2), "sdxl": CostModel(1024, 0.15, 79.9)}
DEFAULT_COST = CostModel(512, 0.2)


def cost_model_for(arch: str | None) -> CostModel:
    """The cost model of an architecture (``None``: a ``--model``), SD 1.5's shape where none was measured."""
    return COST_MODELS.get(arch or "", DEFAULT_COST)


def call_forwards(mode: str, steps: int, warmup: bool = False) -> int:
    """UNet forwards of one call: one; a generation's steps (a warm-up's few); the hires pass's denoising steps."""
    if mode == "unet":
        return 1
    if mode == "hires":
        return hires_steps(steps, warmup)[1]
    return min(steps, WARMUP_STEPS) if warmup else steps


@dataclass
class Workload:
    """A call to time: one UNet forward, one whole generation or one hires pass, with its inputs already built."""

    mode: str
    resolution: int
    images: int
    steps: int
    call: WorkloadCall
    cost_model: CostModel = DEFAULT_COST

    @property
    def unit(self) -> tuple[str, int]:
        """How times are reported: per UNet forward (the whole guided batch) or per image."""
        return ("s/forward", 1) if self.mode == "unet" else ("s/image", self.images)

    def cost(self, warmup: bool = False) -> float:
        """Reference forwards of one call, for :class:`Estimate`."""
        return call_forwards(self.mode, self.steps, warmup) * self.cost_model.units(self.resolution)


def unet_conditioning(unet: torch.nn.Module, batch: int, resolution: int, generator: torch.Generator) -> dict:
    """Random text conditioning of the UNet's shapes (plus SDXL's pooled text and size ids)."""
    config = unet.config
    device, dtype = unet.device, unet.dtype
    shape = (batch, TEXT_TOKENS, config.cross_attention_dim)
    cond: dict[str, Any] = {"encoder_hidden_states": torch.randn(shape, generator=generator).to(device, dtype)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        # (original size, crop top-left, target size), as the SDXL pipeline builds them.
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn((batch, pooled), generator=generator).to(device, dtype),
            "time_ids": time_ids.repeat(batch, 1).to(device),
        }
    elif config.addition_embed_type is not None:
        raise ValueError(f"UNets with addition_embed_type={config.addition_embed_type!r} are not supported")
    return cond


def unet_workload(
    unet: torch.nn.Module,
    resolution: int,
    vae_factor: int,
    cost_model: CostModel = DEFAULT_COST,
    *,
    batch: int,
    timestep: int,
) -> Workload:
    """One UNet forward on seeded random latents of ``resolution / vae_factor`` and text embeddings,
    the guided ``batch`` at training ``timestep`` (SVD's UNet: one video of ``batch / 2`` frames, see ``video``)."""
    generator = torch.Generator().manual_seed(SEED)
    if video.is_video_unet(unet):
        sample, t, cond = video.unet_inputs(unet, batch, resolution, vae_factor, timestep, generator)
    else:
        latent = resolution // vae_factor
        sample = torch.randn((batch, unet.config.in_channels, latent, latent), generator=generator)
        sample = sample.to(unet.device, unet.dtype)
        t = torch.tensor(timestep, device=unet.device)
        cond = unet_conditioning(unet, batch, resolution, generator)

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        torch.manual_seed(SEED)  # tomesd draws its destinations from the global generator
        # ``generate`` is the variant's twin of ``unet``. The sample goes positionally, as pipelines
        # pass it: tomesd's pre-hook reads it from args[0].
        return generate(sample, t, **cond)

    return Workload("unet", resolution, batch // 2, 1, call, cost_model)


def transformer_workload(
    model: torch.nn.Module,
    arch: TransformerArch,
    resolution: int,
    cost_model: CostModel = DEFAULT_COST,
    *,
    batch: int,
    timestep: int,
) -> Workload:
    """One forward of a diffusion transformer at training ``timestep`` on the seeded inputs its pipeline
    gives ``batch / 2`` images (:meth:`TransformerArch.inputs`: a guided pair each, or one row for Flux)."""
    inputs = arch.inputs(model, batch // 2, resolution, timestep, torch.Generator().manual_seed(SEED))

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        return generate(**inputs)

    return Workload("unet", resolution, batch // 2, 1, call, cost_model)


def _to_latents(generate: Callable[..., Any], pipe: Any, images: int, **kwargs: Any) -> Any:
    """One seeded, guided call of ``generate`` (the method's call of ``pipe``) for ``images`` images of
    :data:`PROMPT`, to latents: the VAE decode is no method's business."""
    torch.manual_seed(SEED)  # tomesd draws its destinations from the global generator
    return generate(
        prompt=[PROMPT] * images,
        guidance_scale=GUIDANCE_SCALE,
        output_type="latent",
        generator=torch.Generator(pipe.device).manual_seed(SEED),
        **kwargs,
    )


def pipeline_workload(pipe: Any, resolution: int, steps: int, cost_model: CostModel, *, batch: int) -> Workload:
    """A whole guided generation of ``steps`` steps, ``batch / 2`` images, to latents (no VAE decode)."""
    images = batch // 2

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        steps_run = min(steps, WARMUP_STEPS) if warmup else steps
        return _to_latents(generate, pipe, images, height=resolution, width=resolution, num_inference_steps=steps_run)

    return Workload("pipeline", resolution, images, steps, call, cost_model)


def hires_steps(steps: int, warmup: bool = False) -> tuple[int, int]:
    """(``num_inference_steps`` to ask for, denoising steps that run) of a hires pass of ``steps`` steps.

    Image-to-image runs ``int(steps * strength)`` of the schedule's steps, its last ones; a warm-up
    asks for just enough steps to run :data:`WARMUP_STEPS` of them.
    """
    run = int(steps * HIRES_STRENGTH)
    if warmup and run > WARMUP_STEPS:
        asked = math.ceil(WARMUP_STEPS / HIRES_STRENGTH)
        return asked, int(asked * HIRES_STRENGTH)
    return steps, run


def hires_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline around ``pipe``'s own modules (SD or SDXL), for the hires pass."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def hires_workload(pipe: Any, resolution: int, steps: int, cost_model: CostModel, *, batch: int) -> Workload:
    """The hires fix's second pass at ``resolution``: image-to-image at :data:`HIRES_STRENGTH` from a
    first pass's latent at 1 / :data:`HIRES_UPSCALE` of the size, upscaled in latent space (bilinear).

    The first pass's latent is seeded noise of its shape: the time depends on shapes, not values,
    and the first pass is an ordinary generation (``--mode pipeline`` at the smaller size). Image-to-
    image pipelines take a 4-channel ``image`` as latents as they are, so no VAE runs.
    """
    images = batch // 2
    side = resolution // pipe.vae_scale_factor // HIRES_UPSCALE
    generator = torch.Generator().manual_seed(SEED)
    first = torch.randn((images, pipe.unet.config.in_channels, side, side), generator=generator)
    latent = torch.nn.functional.interpolate(first, scale_factor=HIRES_UPSCALE, mode="bilinear")
    latent = latent.to(pipe.device, pipe.unet.dtype)

    def call(generate: Callable[..., Any], warmup: bool) -> Any:
        asked = hires_steps(steps, warmup)[0]
        return _to_latents(generate, pipe, images, image=latent, strength=HIRES_STRENGTH, num_inference_steps=asked)

    return Workload("hires", resolution, images, steps, call, cost_model)


def run_workloads(
    run: PlannedRun, settings: SpeedSettings, pipe: Any, unet: Any, hires: Any, vae_factor: int
) -> list[Workload]:
    """Every workload of ``run``: each mode at each resolution, in that order (``hires``: the image-to-image
    pipeline around ``pipe``, :func:`hires_pipeline`)."""
    model, batch, timestep = cost_model_for(run.arch), settings.batch, settings.timestep
    transformer = TRANSFORMER_ARCHS.get(run.arch or "")
    builders: dict[str, Callable[[int], Workload]] = {
        "unet": lambda px: (
            unet_workload(unet, px, vae_factor, model, batch=batch, timestep=timestep)
            if transformer is None
            else transformer_workload(unet, transformer, px, model, batch=batch, timestep=timestep)
        ),
        "pipeline": lambda px: pipeline_workload(pipe, px, run.steps, model, batch=batch),
        "hires": lambda px: hires_workload(hires, px, run.steps, model, batch=batch),
    }
    return [builders[mode](px) for mode in run.modes for px in run.resolutions]


def load_models(run: PlannedRun, settings: SpeedSettings) -> tuple[Any, torch.nn.Module, int]:
    """(pipeline or None, UNet or diffusion transformer, VAE scale factor) for one run; the pipeline only
    if a mode needs it."""
    dtype, device = settings.torch_dtype, settings.device
    if run.arch in TRANSFORMER_ARCHS:
        return None, TRANSFORMER_ARCHS[run.arch].build(device, dtype, SEED, settings.flux_blocks), 8
    if run.model is None:
        arch: Arch = ARCHS[run.arch]
        if run.modes == ("unet",):
            return None, arch.build_unet(device, dtype, seed=SEED), 8
        pipe = arch.build_pipeline(device, dtype, seed=SEED)
        return pipe, pipe.unet, pipe.vae_scale_factor
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(run.model, **{dtype_kwarg(): dtype})
    except (OSError, ValueError) as error:
        raise SystemExit(f"speed.py: error: argument --model: cannot load {run.model!r}: {error}") from error
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.unet, pipe.vae_scale_factor
