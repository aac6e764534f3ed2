#!/usr/bin/env python
"""Quality of every registered method on the same seeds: ``python eval/fid.py --ratio 0.4``.

FID (the paper's protocol), CLIP score, and PSNR / SSIM / LPIPS against the SD image of the same
seed, beside the time per image; the methods are ``eval/methods.py``'s (``--help`` lists them).

Defaults (the paper's): SD v1.5 from the hub, PNDM (PLMS) 50 steps, guidance 7.5, 512x512, 2 images
for each of the 1,000 ImageNet-1k classes, prompt "A high quality photograph of a {class}.", fp16 on
CUDA. ``--prompts FILE`` takes one prompt a line instead (e.g. COCO captions; one image each unless
``--images-per-class``). Image i has prompt ``i % P`` and its initial noise comes from
``torch.Generator("cpu").manual_seed(seed + i)`` whatever its batch, process and method (CPU noise,
so that the noise is the same on every device).

Diffusion transformers (SD3 / SD3.5, Flux, PixArt-α/Σ: ``--model`` a pipeline whose model_index.json
has a ``transformer``, read before any weight is loaded): the same protocol, with two defaults of
their own. ``--methods sd tome-phase agentsd``: tomesd patches UNets only, so AgentSD's ToMe phase at
every step stands in for ToMe (methods that patch UNets only are refused). ``--scheduler own``: the
pipeline's own scheduler as its folder configures it, since PNDM and the other named schedulers cannot
drive a flow-matching model (SD3, Flux: refused there). Their steps, guidance and size are the flags'
(the model cards': README); Flux takes no negative prompt and its ``--guidance`` is the distilled
guidance it embeds. PixArt makes the image at ``--size`` (no resolution binning) from the prompt as
written (no caption cleaning). Components the folder leaves out (SD3 without T5) load as ``None``.

Output (``--out``, default ``fid-results``)::

    images/sd/00000.png ...          one folder per method and ratio (tomesd-r0.4, agentsd-r0.4)
    images/<run>/settings.json       what made the images (the scheduler class that ran among them);
                                     a rerun with other settings is refused
    images/<run>/timing-*.json       one timing record per process and run, rewritten after every batch
    cache/*                          Inception statistics, CLIP scores, fidelity scores, keyed by their inputs
    results.json results.csv results.md quality_vs_time.png

Measurements:
* s/img: wall time of the pipeline calls (``torch.cuda.synchronize`` around each batch, PNG saving
  excluded) summed over every process and rerun, divided by the images they made, i.e. seconds per
  image on one device. The first batch of each process and run is a warm-up: kept, not timed
  (unless it is the only batch). Each batch's time is recorded as soon as its images are saved, so a
  killed run keeps the time of what it finished.
* GB/img (CUDA only; "n/a" elsewhere): ``torch.cuda.max_memory_allocated`` during the denoising loop
  (read at every step end, so before VAE decoding) minus the memory allocated before the call,
  divided by the batch size; the largest over the timed batches. The paper instead reports the growth
  of peak memory when the batch grows by one image; both remove the fixed cost of the weights.
* FID: torchmetrics' FrechetInceptionDistance features (torch-fidelity's Inception, TF 2015 weights)
  and its formula; "FID vs SD" compares each method with the SD images of the same seeds.
* CLIP score (``--clip-model``, torchmetrics' default ViT-L/14; ``--no-clip`` skips it) of each image
  with its prompt; PSNR, SSIM and LPIPS (AlexNet; needs torchvision, else skipped with a note;
  ``--no-lpips``) of each image against the SD image of the same seed (see ``quality_metrics.py``).

Resumable: finished images are skipped, each written under a temporary name and renamed (temporaries
a killed run left are removed at the next start); a batch with any image missing is made again
whole. Images do not depend on the batch they ran in: every batch starts every method's randomness
from ``--seed`` (ToMeSD draws one merge pattern per call, shared by the batch; AgentSD hashes
``(seed, timestep, block)``), so batch size, resumes and sharding change no pixel beyond float rounding.
CA-ToMe is the exception (each image merges as many tokens as the most similar image of its batch):
its settings record the batch size, and a resume with another one is refused.
Sharding: ``accelerate launch --num_processes 8 eval/fid.py ...`` gives batch k to process
``k % num_processes`` (one GPU each); the main process waits for the others, then computes the
metrics and writes the tables. Several CPU processes: ``accelerate launch --multi_gpu --num_processes
2 eval/fid.py --device cpu`` (torchrun with gloo; accelerate's ``--cpu`` alone starts one process
unless mpirun is installed).

Errors: bad flags, missing packages and unloadable metric models stop the run before the pipeline is
loaded or anything is written, with a message that names the flag; ``--dtype float16`` on the CPU is
refused (no fallback). The safety checker is off where the pipeline has one (it would blank images
and bias the metrics).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fid_metrics as fm  # noqa: E402
import methods as registry  # noqa: E402
import quality_metrics as qm  # noqa: E402
from atomic_write import atomic_path, remove_stale_temporaries  # noqa: E402
from methods import Variant  # noqa: E402
from shared import DTYPES, HelpFormatter, dtype_kwarg  # noqa: E402
from timing import synchronize, timed  # noqa: E402

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_TEMPLATE = "A high quality photograph of a {}."
# --methods by default: the paper's on a UNet pipeline; on a diffusion transformer, which tomesd cannot
# patch, AgentSD's ToMe phase at every step stands in for ToMe.
UNET_METHODS = ("sd", "tomesd", "agentsd")
TRANSFORMER_METHODS = ("sd", "tome-phase", "agentsd")
OWN = "own"  # --scheduler: the pipeline's own scheduler, as its folder configures it
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Published (SD v1.5, 2,000 images, RTX 4090): (FID, s/img, GB/img), keyed by (method, ratio).
PAPER = {
    ("sd", None): (28.84, 2.62, 3.13),
    ("tomesd", 0.4): (28.74, 1.71, 1.69),
    ("agentsd", 0.4): (28.15, 1.54, 1.55),
    ("agentsd", 0.5): (28.42, 1.42, 1.21),
}


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fid.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a(
        "--ratio",
        "--ratios",
        dest="ratios",
        type=float,
        nargs="+",
        default=[0.4],
        help="token-merging ratio(s), in [0, 1), for the methods that merge",
    )
    registry.add_method_arguments(p, default=UNET_METHODS, timing=False)
    a(
        "--model",
        default=DEFAULT_MODEL,
        help="hub id or local folder of a diffusers pipeline; a diffusion transformer (SD3, Flux, PixArt) "
        f"runs --methods {' '.join(TRANSFORMER_METHODS)} and --scheduler {OWN} unless told otherwise",
    )
    a(
        "--scheduler",
        default=None,
        help=f"{OWN} (the pipeline's own, as its folder configures it) or one of {', '.join(SCHEDULERS)}, "
        f"which a flow-matching model (SD3, Flux) cannot take (default: pndm, the paper's, for a UNet "
        f"pipeline; {OWN} for a diffusion transformer)",
    )
    a("--steps", type=int, default=50, help="denoising steps")
    a("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    a("--size", default="512", help="N (square) or WIDTHxHEIGHT, in pixels")
    a(
        "--images-per-class",
        type=int,
        default=None,
        help="images of each class (default 2, the paper's) or of each --prompts line (default 1)",
    )
    a(
        "--num-images",
        type=int,
        default=None,
        help="total image count (overrides --images-per-class); image i has prompt i %% P",
    )
    a("--classes", default=None, help="class-name file, one a line (default: ImageNet-1k, shipped with agentsd)")
    a("--prompt", default=DEFAULT_TEMPLATE, help="prompt template; {} is the class name")
    a(
        "--prompts",
        default=None,
        metavar="FILE",
        help="one prompt a line (e.g. COCO captions), instead of classes in --prompt",
    )
    a("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    a("--batch-size", type=int, default=4, help="images per pipeline call (and per timing/memory sample)")
    a("--device", default=None, help="cuda, cuda:1, cpu, mps (default: accelerate's device for this process)")
    a("--dtype", default="auto", help="auto (float16 on CUDA, else float32), float16, bfloat16, float32")
    a("--out", default="fid-results", help="output folder")
    a(
        "--reference",
        default=None,
        help="folder of real images (centre-cropped and resized to --size), or a .npz with mu and sigma (pytorch-fid)",
    )
    a("--inception-weights", default=None, help=f"local {fm.INCEPTION_FILE} instead of downloading it")
    a("--fid-batch-size", type=int, default=50, help="images per feature-extractor (and CLIP, LPIPS) call")
    a(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="image-loading workers for the metrics (0: none)",
    )
    a("--no-fid", action="store_true", help="skip FID (no torch-fidelity needed)")
    a("--clip-model", default=qm.DEFAULT_CLIP, help="CLIP model for the CLIP score: hub id or local folder")
    a("--no-clip", action="store_true", help="skip the CLIP score (no CLIP weights needed)")
    a("--no-lpips", action="store_true", help="skip LPIPS (otherwise computed when torchvision is installed)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, state) -> None:
    """Every check that can fail, before any model is loaded or file written; errors name the flag."""
    # argparse hands over the default list itself when --methods is not given: then the model decides
    # (check_model), so that a default the model does not take (tomesd) is neither run nor looked for.
    explicit_methods = args.methods is not p.get_default("methods")
    try:
        if explicit_methods:
            args.methods = registry.resolve_methods(args.methods, timing=False)
        args.options = registry.options_from(args)
    except ValueError as exc:  # it names the flag
        p.error(str(exc))
    for r in args.ratios:
        if not 0.0 <= r < 1.0:
            p.error(f"--ratio: {r} is outside [0, 1)")
    if args.scheduler not in (None, OWN, *SCHEDULERS):
        p.error(f"--scheduler: unknown scheduler {args.scheduler!r}; choose from {OWN}, {', '.join(SCHEDULERS)}")
    for flag in ("steps", "batch_size", "fid_batch_size", "images_per_class", "num_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')}: must be at least 1, got {value}")
    if args.workers < 0:
        p.error(f"--workers: must be 0 (load images in the main process) or more, got {args.workers}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance: must be a finite number, got {args.guidance}")
    try:
        w, h = (int(v) for v in args.size.lower().split("x")) if "x" in args.size.lower() else (int(args.size),) * 2
    except ValueError:
        p.error(f"--size: expected N or WIDTHxHEIGHT, got {args.size!r}")
    if w < 8 or h < 8 or w % 8 or h % 8:
        p.error(f"--size: width and height must be multiples of 8, got {w}x{h}")
    args.width, args.height = w, h
    check_prompts(p, args)

    try:
        args.device = torch.device(args.device) if args.device else state.device
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    if args.device.type == "cuda" and state.num_processes > 1:
        args.device = state.device
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device: CUDA is not available here; use --device cpu (and --dtype float32)")
    if args.dtype == "auto":
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    if args.dtype not in DTYPES:
        p.error(f"--dtype: unknown dtype {args.dtype!r}; choose from auto, {', '.join(DTYPES)}")
    if args.dtype == "float16" and args.device.type == "cpu":
        p.error("--dtype: float16 is not supported on the CPU; use --dtype float32 (or bfloat16)")

    args.out = Path(args.out)
    existing = next(q for q in (args.out, *args.out.parents) if q.exists())  # nothing is created before the run
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        p.error(f"--out: cannot write to {args.out}: {existing} is not a writable folder")

    if args.reference:
        ref = Path(args.reference)
        if ref.suffix == ".npz" and ref.is_file():
            try:
                fm.Stats.load(ref)
            except Exception as exc:
                p.error(f"--reference: cannot read {ref}: {exc}")
        elif ref.is_dir():
            if len(fm.list_images(ref)) < 2:
                p.error(f"--reference: {ref} holds fewer than 2 images")
        else:
            p.error(f"--reference: no such folder or .npz file: {ref}")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        p.error(f"--inception-weights: no such file {args.inception_weights}")

    if args.total < 2 and not args.no_fid:
        p.error("--num-images: FID needs at least 2 images (or pass --no-fid)")
    check_model(p, args, explicit_methods)
    args.runs = registry.variants(args.methods, args.ratios)
    for run in args.runs:
        settings_file = args.out / "images" / run.name / "settings.json"
        if settings_file.is_file():
            old, new = json.loads(settings_file.read_text()), run_settings(args, run)
            diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
            diff += [f"{k}: {old[k]!r} -> (none)" for k in old if k not in new]
            if diff:
                p.error(
                    f"--out: {settings_file.parent} holds images made with other settings ({'; '.join(diff)}); "
                    "choose another --out or delete that folder"
                )


@dataclass(frozen=True)
class PipelineIndex:
    """What a pipeline's ``model_index.json`` says, read before any weight is loaded.

    Attributes:
        name: The pipeline class.
        transformer: Its denoiser is a diffusion transformer (SD3, Flux, PixArt), not a UNet.
        scheduler: The class of its own scheduler.
        absent: The components its folder leaves out (e.g. SD3 without T5), passed as ``None`` when it
            is loaded, as its pipeline asks.
        safety_checker: It takes ``safety_checker`` (SD 1.x/2.x), which fid.py turns off.
    """

    name: str
    transformer: bool
    scheduler: str
    absent: tuple[str, ...] = ()
    safety_checker: bool = False

    @property
    def flow_matching(self) -> bool:
        """A flow-matching model (SD3, Flux): only a flow-matching scheduler, such as its own, can drive it."""
        return self.scheduler.startswith("FlowMatch")


def read_pipeline_index(model: str) -> PipelineIndex:
    """The :class:`PipelineIndex` of a local folder or hub id (of a hub id, only ``model_index.json`` is fetched)."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(model)
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    return PipelineIndex(
        name=index.get("_class_name", "?"),
        transformer=components.get("transformer", [None, None])[1] is not None,
        scheduler=components.get("scheduler", [None, "?"])[1] or "?",
        absent=tuple(name for name, (_, cls) in components.items() if cls is None),
        safety_checker="safety_checker" in components,
    )


def check_model(p: argparse.ArgumentParser, args: argparse.Namespace, explicit_methods: bool) -> None:
    """The model's family decides the default methods and scheduler (``args.index``, ``args.scheduler_class``);
    a method or scheduler it cannot take is refused, naming the flag."""
    try:
        args.index = index = read_pipeline_index(args.model)
    except Exception as exc:
        p.error(
            f"--model: cannot read the model_index.json of {args.model!r} ({type(exc).__name__}: {exc}). "
            "Pass a local pipeline folder, or log in / go online for a hub id."
        )
    if not explicit_methods:
        try:
            args.methods = registry.resolve_methods(
                TRANSFORMER_METHODS if index.transformer else UNET_METHODS, timing=False
            )
        except ValueError as exc:  # a default method that cannot run here; it names --methods
            p.error(str(exc))
    if index.transformer:
        if refused := [m.name for m in args.methods if not m.transformers]:
            accepted = [n for n, m in registry.METHODS.items() if m.transformers and not m.timing_only]
            p.error(
                f"--methods: {', '.join(refused)} patch{'es' if len(refused) == 1 else ''} UNets only; "
                f"{args.model} is a diffusion transformer pipeline ({index.name}); choose from {', '.join(accepted)}"
            )
    if args.scheduler is None:
        args.scheduler = OWN if index.transformer else "pndm"
    if index.flow_matching and args.scheduler != OWN:
        p.error(
            f"--scheduler: {args.scheduler} cannot drive {args.model}, a flow-matching model ({index.name}, "
            f"scheduler {index.scheduler}); use --scheduler {OWN}"
        )
    args.scheduler_class = index.scheduler if args.scheduler == OWN else SCHEDULERS[args.scheduler]


def check_prompts(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.prompts``, the prompt of each image index modulo its length, and ``args.total``."""
    if args.prompts is not None:
        if args.classes is not None or args.prompt != DEFAULT_TEMPLATE:
            p.error("--prompts: a prompt file replaces --classes and --prompt; pass one or the other")
        path = Path(args.prompts)
        if not path.is_file():
            p.error(f"--prompts: no such file {path}")
        args.prompt_list = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not args.prompt_list:
            p.error(f"--prompts: {path} holds no prompt (one a line)")
        args.prompt_source, per_prompt = str(path), 1
    else:
        if "{}" not in args.prompt:
            p.error("--prompt: the template needs a {} where the class name goes")
        shipped = Path(str(files("agentsd") / "data" / "imagenet1k_classes.txt"))
        classes = Path(args.classes) if args.classes else shipped
        if not classes.is_file():
            p.error(f"--classes: no such file {classes}")
        names = [c.strip() for c in classes.read_text(encoding="utf-8").splitlines() if c.strip()]
        if not names:
            p.error(f"--classes: {classes} holds no class name (one a line)")
        args.prompt_list = [args.prompt.format(name) for name in names]
        args.prompt_source, per_prompt = (
            f"{'ImageNet-1k' if classes == shipped else classes} classes in {args.prompt!r}",
            2,
        )
    args.total = args.num_images or (args.images_per_class or per_prompt) * len(args.prompt_list)


def protocol(args) -> dict:
    """The generation protocol shared by every method: model, sampler (the scheduler class that ran), size,
    dtype, seed."""
    keys = ("model", "steps", "guidance", "width", "height", "dtype", "seed")
    return {"scheduler": args.scheduler_class, **{key: getattr(args, key) for key in keys}}


def run_settings(args, run: Variant) -> dict:
    """Everything that decides the pixels of image i (not the image count or device; the batch size only
    where the method makes an image depend on its batch)."""
    digest = hashlib.sha1("\n".join(args.prompt_list).encode()).hexdigest()[:12]
    prompts = f"{len(args.prompt_list)} prompts, sha1 {digest}"
    batch = {"batch_size": args.batch_size} if run.method.batch_dependent else {}
    return {**run.method.settings(run.ratio, args.options), **protocol(args), "prompts": prompts, **batch}


# ---------------------------------------------------------------------------------------------
# Generation


def load_pipeline(args):
    """The pipeline of ``--model`` in ``--dtype`` on ``--device``, its safety checker off (where it has
    one), the components its folder leaves out passed as ``None``, with ``--scheduler``'s scheduler."""
    import diffusers

    kwargs = {dtype_kwarg(): DTYPES[args.dtype], **dict.fromkeys(args.index.absent)}
    if args.index.safety_checker:
        kwargs |= dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, **kwargs)
    except Exception as exc:
        sys.exit(
            f"fid.py: error: --model: cannot load {args.model!r} ({type(exc).__name__}: {exc}). "
            "Pass a local folder, or log in / go online for a hub id."
        )
    if args.scheduler != OWN:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def prompt_for(args, i: int) -> str:
    """Image i has prompt ``i % P``: any prefix of the image list spreads over the classes (or prompts)."""
    return args.prompt_list[i % len(args.prompt_list)]


def call_options(pipe) -> dict:
    """The pipeline call's arguments beyond the protocol's, where the pipeline takes them: PixArt's
    ``use_resolution_binning=False`` (the image is made at ``--size``, not at the nearest trained aspect
    ratio and resized; a square size of its bins is the same) and ``clean_caption=False`` (the prompt goes
    to T5 as written: the cleaning needs bs4 and ftfy and turns itself off without them, so the pixels
    would depend on what is installed)."""
    wanted = {"use_resolution_binning": False, "clean_caption": False}
    accepted = inspect.signature(pipe.__call__).parameters
    return {key: value for key, value in wanted.items() if key in accepted}


def image_path(folder: Path, i: int) -> Path:
    return folder / f"{i:05d}.png"


def timed_images(call, device, **kwargs) -> tuple[list, float]:
    """The images of one pipeline call, and its seconds, the device's queued work included."""
    images: list = []
    seconds = timed(lambda: images.extend(call(**kwargs).images), device)
    return images, seconds


def generate(pipe, run: Variant, args, state) -> None:
    """Make this process's missing images of ``run``; record each batch's time as soon as it is saved."""
    from tqdm.auto import tqdm

    folder = args.out / "images" / run.name
    n, b = args.total, args.batch_size
    batches = [list(range(s, min(s + b, n))) for s in range(0, n, b)]
    mine = [idx for k, idx in enumerate(batches) if k % state.num_processes == state.process_index]
    todo = [idx for idx in mine if not all(image_path(folder, i).exists() for i in idx)]
    if not todo:
        return
    cuda = args.device.type == "cuda"
    peak: list[int | None] = [None]  # read at each step end, before the VAE decodes

    def on_step_end(_pipe, _step, _t, _kwargs):
        if cuda:
            peak[0] = torch.cuda.max_memory_allocated(args.device)
        return {}

    extra = call_options(pipe)
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        extra["callback_on_step_end"] = on_step_end
    record = {
        "device": torch.cuda.get_device_name(args.device) if cuda else str(args.device),
        "process": state.process_index,
        "batch_size": b,
        "batches": [],  # {"images": [...], "seconds": s, "peak_bytes_per_image": m}; the first is a warm-up
    }
    record_path = folder / f"timing-{time.strftime('%Y%m%d-%H%M%S')}-p{state.process_index}-{os.getpid()}.json"
    with tqdm(
        total=sum(map(len, todo)), desc=f"{run.name} [{state.process_index}]", unit="img", position=state.process_index
    ) as bar:
        for idx in todo:
            # The same randomness for every batch: ToMeSD forks the global RNG at its first call after a
            # patch and draws one merge pattern per call for the whole batch, so a seed per batch would
            # make an image depend on the batch it ran in.
            with torch.random.fork_rng(devices=[args.device] if cuda else []):
                torch.manual_seed(args.seed)
                with run.method.applied(pipe, ratio=run.ratio, seed=args.seed, options=args.options) as call:
                    prompts = [prompt_for(args, i) for i in idx]
                    gens = [torch.Generator("cpu").manual_seed(args.seed + i) for i in idx]
                    synchronize(args.device)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(args.device)
                        base, peak[0] = torch.cuda.memory_allocated(args.device), None
                    images, seconds = timed_images(
                        call,
                        args.device,
                        prompt=prompts,
                        num_inference_steps=args.steps,
                        guidance_scale=args.guidance,
                        height=args.height,
                        width=args.width,
                        generator=gens,
                        **extra,
                    )
            if cuda and peak[0] is None:  # the loop took no step callback: the peak includes decoding
                peak[0] = torch.cuda.max_memory_allocated(args.device)
            for i, image in zip(idx, images):
                with atomic_path(image_path(folder, i)) as tmp:
                    image.save(tmp, format="PNG")
            per_image = (peak[0] - base) / len(idx) if cuda else None
            record["batches"].append({"images": idx, "seconds": seconds, "peak_bytes_per_image": per_image})
            with atomic_path(record_path) as tmp:  # after the images: a batch is timed once it is kept
                tmp.write_text(json.dumps(record))
            bar.update(len(idx))


def timing(folder: Path) -> dict:
    """s/img and GB/img of an image folder, from all its timing records (None where unmeasured).

    The first batch of each record (a process's run) is its warm-up, left out unless it is the only one;
    memory comes from full batches where there are any (a short last batch overstates it).
    """
    timed = []
    devices = set()
    for f in sorted(folder.glob("timing-*.json")):
        rec = json.loads(f.read_text())
        timed += [(bt, rec["batch_size"]) for bt in (rec["batches"][1:] or rec["batches"])]
        devices.add(rec["device"])
    images = sum(len(bt["images"]) for bt, _ in timed)
    full = [bt["peak_bytes_per_image"] for bt, size in timed if len(bt["images"]) == size]
    mem = [m for m in full or [bt["peak_bytes_per_image"] for bt, _ in timed] if m is not None]
    return {
        "sec_per_image": sum(bt["seconds"] for bt, _ in timed) / images if images else None,
        "gb_per_image": max(mem) / 2**30 if mem else None,
        "timed_images": images,
        "devices": sorted(devices),
    }


# ---------------------------------------------------------------------------------------------
# Metrics and reports


def sd_paths(args, paths: dict) -> list[Path] | None:
    """The SD images of the same seeds: this run's, or an earlier run's with the same settings."""
    sd = Variant(registry.BASELINE)
    if sd in paths:
        return paths[sd]
    folder = args.out / "images" / sd.name
    candidate = [image_path(folder, i) for i in range(args.total)]
    settings = folder / "settings.json"
    if settings.is_file() and all(p.exists() for p in candidate):
        if json.loads(settings.read_text()) == run_settings(args, sd):
            return candidate
    return None


def evaluate(args, extractor, clip, lpips) -> list[dict]:
    """One row per run: FID (against the reference and SD), CLIP score, fidelity to SD, timing."""
    sd = Variant(registry.BASELINE)
    paths = {run: [image_path(args.out / "images" / run.name, i) for i in range(args.total)] for run in args.runs}
    baseline = sd_paths(args, paths)
    cache, opts = args.out / "cache", dict(batch_size=args.fid_batch_size, workers=args.workers)
    ref, stats = None, {}
    if extractor is not None:
        metric = fm.make_metric(extractor, args.device)
        if args.reference:
            path = Path(args.reference).resolve()
            if path.suffix == ".npz":
                ref = fm.Stats.load(path)
            else:
                key = hashlib.sha1(str(path).encode()).hexdigest()[:12]
                ref = fm.image_stats(
                    metric,
                    fm.list_images(path),
                    size=(args.width, args.height),
                    cache=cache / f"reference-{key}.npz",
                    desc="reference features",
                    **opts,
                )
        sets = {**paths, **({sd: baseline} if baseline else {})}
        stats = {
            run: fm.image_stats(metric, ps, cache=cache / f"{run.name}.npz", desc=f"{run.name} features", **opts)
            for run, ps in sets.items()
        }
        metric.cpu()
    prompts = [prompt_for(args, i) for i in range(args.total)]
    prompts_id = hashlib.sha1("\n".join(prompts).encode()).hexdigest()
    base = timing(args.out / "images" / sd.name)["sec_per_image"] if baseline else None
    rows = []
    for run in args.runs:
        ps = paths[run]
        clip_score = None
        if clip is not None:
            clip_score = qm.cached(
                cache / f"{run.name}-clip.json",
                qm.pairs_key(ps, [], clip.model_id, prompts_id),
                partial(qm.clip_score, clip, ps, prompts, device=args.device, **opts),
            )
        fidelity = {"psnr": None, "ssim": None, "lpips": None}
        if baseline is not None and run != sd:
            lpips_id = qm.weights_digest(lpips) if lpips is not None else None
            fidelity = qm.cached(
                cache / f"{run.name}-vs-sd.json",
                qm.pairs_key(ps, baseline, lpips_id),
                partial(qm.fidelity, ps, baseline, lpips, device=args.device, **opts),
            )
        t = timing(args.out / "images" / run.name)
        paper = (None,) * 3  # the published numbers are SD v1.5's: not shown beside a transformer's
        if not args.index.transformer:
            paper = PAPER.get((run.method.name, None if run.ratio is None else round(run.ratio, 4)), paper)
        rows.append(
            {
                "method": run.method.name,
                "ratio": run.ratio,
                "label": run.label,
                "images": len(ps),
                "fid": fm.frechet_distance(stats[run], ref) if ref is not None else None,
                "fid_vs_sd": fm.frechet_distance(stats[run], stats[sd]) if sd in stats and run != sd else None,
                "clip_score": clip_score,
                **fidelity,
                **t,
                "speedup_vs_sd": base / t["sec_per_image"] if base and t["sec_per_image"] else None,
                "paper_fid": paper[0],
                "paper_sec_per_image": paper[1],
                "paper_gb_per_image": paper[2],
            }
        )
    return rows


def fmt(v, digits=2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# (row key, table heading, digits, "lower"/"higher" is better); the plot draws the first five.
QUALITY = [
    ("fid", "FID", 2, "lower"),
    ("fid_vs_sd", "FID vs SD", 2, "lower"),
    ("clip_score", "CLIP score", 2, "higher"),
    ("psnr", "PSNR vs SD (dB)", 2, "higher"),
    ("ssim", "SSIM vs SD", 4, "higher"),
    ("lpips", "LPIPS vs SD", 4, "lower"),
]


def write_reports(args, rows: list[dict], models: dict, notes: list[str]) -> None:
    out = args.out
    meta = {
        **protocol(args),
        "prompts": args.prompt_source,
        "images": args.total,
        "batch_size": args.batch_size,
        "reference": args.reference,
        **models,
        "notes": notes,
        "time": "s/img: synchronized wall time of the pipeline calls / images, warm-up batch excluded, per device",
        "memory": "GB/img: (peak allocated during denoising - allocated before the call) / batch size; CUDA only",
        "fidelity": "PSNR, SSIM, LPIPS: each image against the SD image of the same seed, averaged over images",
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    cols = ["method", "ratio", "images", *(q[0] for q in QUALITY), "sec_per_image", "speedup_vs_sd", "gb_per_image"]
    cols += ["paper_fid", "paper_sec_per_image", "paper_gb_per_image"]
    with atomic_path(out / "results.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paper = "" if args.index.transformer else "; paper: SD v1.5, 2,000 images, RTX 4090"
    lines = [
        f"Quality on {args.total} images ({args.width}x{args.height}, {args.steps} steps of "
        f"{args.scheduler_class}, guidance {args.guidance}, {args.dtype}, model {args.model}, prompts: "
        f"{args.prompt_source}){paper}.",
        "",
        "| Method | r | "
        + " | ".join(q[1] for q in QUALITY)
        + " | s/img | speed-up | GB/img | paper FID | paper s/img |",
        "|---" * (len(QUALITY) + 7) + "|",
    ]
    for r in rows:
        speedup = fmt(r["speedup_vs_sd"]) + ("x" if r["speedup_vs_sd"] else "")
        quality = " | ".join(fmt(r[key], digits) for key, _, digits, _ in QUALITY)
        lines.append(
            f"| {r['label']} | {fmt(r['ratio'])} | {quality} | {fmt(r['sec_per_image'], 3)} | {speedup} | "
            f"{fmt(r['gb_per_image'])} | {fmt(r['paper_fid'])} | {fmt(r['paper_sec_per_image'])} |"
        )
    lines += ["", *(f"{n}." for n in notes), meta["time"] + ".", meta["memory"] + ".", meta["fidelity"] + "."]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(out / "quality_vs_time.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    """One panel per measured metric, against seconds per image; one marker per method, one legend for all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [q for q in QUALITY if any(r[q[0]] is not None and math.isfinite(r[q[0]]) for r in rows)] or QUALITY[:1]
    cols = min(len(panels), 3)
    spare = -len(panels) % cols  # an empty panel holds the legend; else it goes below
    legend_in = 0.0 if spare else 0.3 + 0.22 * -(-len(rows) // 3)
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.3 * cols, 3.6 * n_rows + legend_in), squeeze=False)
    style = {r["label"]: (f"C{k % 10}", "os^Dv<>ph*"[k // 10 % 10]) for k, r in enumerate(rows)}
    for ax, (key, name, _, better) in zip(axes.flat, panels):
        for r in rows:
            x, y = r["sec_per_image"], r[key]
            if x is not None and y is not None and math.isfinite(y):
                color, marker = style[r["label"]]
                ax.scatter(x, y, s=45, color=color, marker=marker)
        ax.set(xlabel="seconds per image", ylabel=name, title=f"{name} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=label) for label, (c, m) in style.items()]
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if spare:
        axes.flat[len(panels)].legend(handles=handles, loc="center", fontsize=8, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def setup_models(parser, args, state, feature_extractor, lpips_net) -> tuple:
    """The metric models, built on the main process before any image is made (so a missing one stops the
    run at once); ``None`` where skipped, with a note saying why for LPIPS."""
    extractor = clip = lpips = None
    notes = []
    try:
        if not args.no_fid:
            if feature_extractor is not None:
                extractor = feature_extractor
            elif not fm.torch_fidelity_available():
                raise fm.FidSetupError(fm.NO_TORCH_FIDELITY)
            elif state.is_main_process:  # may download the weights
                extractor = fm.build_inception(args.inception_weights)
        if not args.no_clip and state.is_main_process:
            clip = qm.load_clip(args.clip_model)
        if args.no_lpips:
            notes.append("LPIPS skipped (--no-lpips)")
        elif lpips_net is not None:
            lpips = lpips_net
        elif not qm.lpips_available():
            notes.append(qm.LPIPS_UNAVAILABLE)
        elif state.is_main_process:
            lpips = qm.build_lpips()
    except fm.FidSetupError as exc:
        parser.error(str(exc))
    return extractor, clip, lpips, notes


def main(
    argv: list[str] | None = None,
    *,
    feature_extractor: torch.nn.Module | None = None,
    lpips_net: torch.nn.Module | None = None,
) -> list[dict] | None:
    """Run the experiment. ``feature_extractor`` and ``lpips_net`` replace the Inception and LPIPS networks
    (tests); the rest is the same."""
    from accelerate import PartialState

    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun / accelerate launch without CUDA (or with --device cpu) the processes meet over gloo.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=args.device == "cpu" or (world > 1 and not torch.cuda.is_available()))
    check_args(parser, args, state)
    extractor, clip, lpips, notes = setup_models(parser, args, state, feature_extractor, lpips_net)
    if state.is_main_process:
        for note in notes:
            print(f"fid.py: {note}", flush=True)
        runs = ", ".join(r.label for r in args.runs)
        print(
            f"fid.py: {runs} | {args.model} | {args.total} images, {args.steps} steps of {args.scheduler_class}, "
            f"guidance {args.guidance}, {args.width}x{args.height}, {args.dtype} on {args.device} x "
            f"{state.num_processes} process(es) | results -> {args.out.resolve()}",
            flush=True,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(args.out)  # before any process of this run writes
        for run in args.runs:
            folder = args.out / "images" / run.name
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "settings.json").exists():  # check_args refused a mismatch already
                with atomic_path(folder / "settings.json") as tmp:  # other processes may be reading it
                    tmp.write_text(json.dumps(run_settings(args, run), indent=2))
    state.wait_for_everyone()

    pipe = load_pipeline(args)
    for run in args.runs:
        generate(pipe, run, args, state)
    del pipe
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    rows = evaluate(args, extractor, clip, lpips)
    models = {
        "feature_extractor": fm.extractor_id(extractor) if extractor is not None else None,
        "clip_model": clip.model_id if clip is not None else None,
        "lpips_model": f"{getattr(lpips, 'lpips_name', type(lpips).__name__)}@{qm.weights_digest(lpips)}"
        if lpips
        else None,
    }
    write_reports(args, rows, models, notes)
    print((args.out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
