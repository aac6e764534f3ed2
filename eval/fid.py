#!/usr/bin/env python
"""FID of SD, ToMeSD and AgentSD under the published protocol: ``python eval/fid.py --ratio 0.4``.

Defaults (the paper's): SD v1.5 from the hub, PNDM (PLMS) 50 steps, guidance 7.5, 512x512, 2 images
for each of the 1,000 ImageNet-1k classes, prompt "A high quality photograph of a {class}.", fp16 on
CUDA. Image i has class ``i % 1000`` and its initial noise comes from
``torch.Generator("cpu").manual_seed(seed + i)`` whatever its batch, process and method (CPU noise,
so that the noise is the same on every device). Methods differ only by their attention.

Output (``--out``, default ``fid-results``)::

    images/sd/00000.png ...          one folder per method and ratio (tomesd-r0.40, agentsd-r0.40)
    images/<run>/settings.json       what made the images; a rerun with other settings is refused
    images/<run>/timing-*.json       one timing record per process and run that generated images
    cache/*.npz                      Inception statistics (reference and each image set), keyed
    results.json results.csv results.md fid_vs_time.png

Measurements:
* s/img: wall time of the pipeline calls (``torch.cuda.synchronize`` around each batch, PNG saving
  excluded) summed over every process and rerun, divided by the images they made, i.e. seconds per
  image on one device. The first batch of each process and run is a warm-up: kept, not timed
  (unless it is the only batch).
* GB/img (CUDA only; "n/a" elsewhere): ``torch.cuda.max_memory_allocated`` during the denoising loop
  (read at every step end, so before VAE decoding) minus the memory allocated before the call,
  divided by the batch size; the largest over the timed batches. The paper instead reports the growth
  of peak memory when the batch grows by one image; both remove the fixed cost of the weights.
* FID: torchmetrics' FrechetInceptionDistance features (torch-fidelity's Inception, TF 2015 weights)
  and its formula; "FID vs SD" compares each method with the SD images of the same seeds.

Resumable: finished images are skipped, each written under a temporary name and renamed; a batch with
any image missing is made again whole (so the token-merging randomness, seeded per batch, repeats).
Sharding: ``accelerate launch --num_processes 8 eval/fid.py ...`` gives batch k to process
``k % num_processes`` (one GPU each); the main process waits for the others, then computes FID and
writes the tables. Several CPU processes: ``accelerate launch --multi_gpu --num_processes 2 eval/fid.py
--device cpu`` (torchrun with gloo; accelerate's ``--cpu`` alone starts one process unless mpirun is
installed). Images do not depend on the process count, up to float rounding of the thread count.

Errors: bad flags stop the run before the model is loaded, with a message that names the flag;
``--dtype float16`` on the CPU is refused (no fallback). The safety checker is off (it would blank
images and bias FID).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fid_metrics as fm  # noqa: E402
from atomic_write import atomic_path  # noqa: E402

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
METHODS = ("sd", "tomesd", "agentsd")
LABELS = {"sd": "SD", "tomesd": "ToMeSD", "agentsd": "AgentSD"}
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Published (SD v1.5, 2,000 images, RTX 4090): (FID, s/img, GB/img), keyed by (method, ratio).
PAPER = {
    ("sd", 0.0): (28.84, 2.62, 3.13),
    ("tomesd", 0.4): (28.74, 1.71, 1.69),
    ("agentsd", 0.4): (28.15, 1.54, 1.55),
    ("agentsd", 0.5): (28.42, 1.42, 1.21),
}


@dataclass(frozen=True)
class Run:
    method: str
    ratio: float = 0.0

    @property
    def name(self) -> str:
        if self.method == "sd":
            return "sd"
        r = f"{self.ratio:.6f}".rstrip("0")
        return f"{self.method}-r{r if len(r.split('.')[1]) >= 2 else f'{self.ratio:.2f}'}"

    @property
    def label(self) -> str:
        return LABELS[self.method] + ("" if self.method == "sd" else f" r={self.ratio:g}")


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fid.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    a(
        "--ratio",
        "--ratios",
        dest="ratios",
        type=float,
        nargs="+",
        default=[0.4],
        help="token-merging ratio(s), in [0, 1)",
    )
    a("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)} (space or comma separated)")
    a("--model", default=DEFAULT_MODEL, help="hub id or local folder of a diffusers pipeline")
    a("--scheduler", default="pndm", help=f"one of {', '.join(SCHEDULERS)}")
    a("--steps", type=int, default=50, help="denoising steps")
    a("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    a("--size", default="512", help="N (square) or WIDTHxHEIGHT, in pixels")
    a("--images-per-class", type=int, default=2, help="images of each class")
    a(
        "--num-images",
        type=int,
        default=None,
        help="total image count (overrides --images-per-class); image i has class i %% C",
    )
    a("--classes", default=None, help="class-name file, one a line (default: ImageNet-1k, shipped with agentsd)")
    a("--prompt", default="A high quality photograph of a {}.", help="prompt template; {} is the class name")
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
    a("--fid-batch-size", type=int, default=50, help="images per feature-extractor call")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading workers for FID")
    a("--no-fid", action="store_true", help="only generate and time images")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, state) -> None:
    """Every check that can fail, before any model is loaded or image generated; errors name the flag."""
    args.methods = [m.strip() for item in args.methods for m in item.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    args.methods = sorted(set(args.methods), key=METHODS.index)
    for r in args.ratios:
        if not 0.0 <= r < 1.0:
            p.error(f"--ratio: {r} is outside [0, 1)")
    if args.scheduler not in SCHEDULERS:
        p.error(f"--scheduler: unknown scheduler {args.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    for flag in ("steps", "images_per_class", "batch_size", "fid_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    if args.num_images is not None and args.num_images < 1:
        p.error(f"--num-images: must be at least 1, got {args.num_images}")
    try:
        w, h = (int(v) for v in args.size.lower().split("x")) if "x" in args.size.lower() else (int(args.size),) * 2
    except ValueError:
        p.error(f"--size: expected N or WIDTHxHEIGHT, got {args.size!r}")
    if w < 8 or h < 8 or w % 8 or h % 8:
        p.error(f"--size: width and height must be multiples of 8, got {w}x{h}")
    args.width, args.height = w, h
    if "{}" not in args.prompt:
        p.error("--prompt: the template needs a {} where the class name goes")
    classes = Path(args.classes) if args.classes else Path(str(files("agentsd") / "data" / "imagenet1k_classes.txt"))
    if not classes.is_file():
        p.error(f"--classes: no such file {classes}")
    args.class_names = [c.strip() for c in classes.read_text().splitlines() if c.strip()]

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

    if "tomesd" in args.methods:
        if importlib.util.find_spec("tomesd") is None:
            p.error('--methods: tomesd needs the tomesd package: pip install "agentsd[eval]"')
    if "agentsd" in args.methods and importlib.util.find_spec("agentsd") is None:
        p.error('--methods: agentsd is not installed: pip install -e ".[eval]" from the repository root')

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        p.error(f"--out: cannot write to {out}: {exc.strerror or exc}")
    args.out = out

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

    args.total = args.num_images or args.images_per_class * len(args.class_names)
    if args.total < 2 and not args.no_fid:
        p.error("--num-images: FID needs at least 2 images (or pass --no-fid)")
    args.runs = [Run("sd")] if "sd" in args.methods else []
    args.runs += [Run(m, r) for m in ("tomesd", "agentsd") if m in args.methods for r in dict.fromkeys(args.ratios)]
    for run in args.runs:
        settings_file = args.out / "images" / run.name / "settings.json"
        if settings_file.is_file():
            old, new = json.loads(settings_file.read_text()), run_settings(args, run)
            diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
            if diff:
                p.error(
                    f"--out: {settings_file.parent} holds images made with other settings ({'; '.join(diff)}); "
                    "choose another --out or delete that folder"
                )


def protocol(args) -> dict:
    """The generation protocol shared by every method: model, sampler, size, dtype, seed, prompt."""
    keys = ("model", "scheduler", "steps", "guidance", "width", "height", "dtype", "seed", "prompt")
    return {key: getattr(args, key) for key in keys}


def run_settings(args, run: Run) -> dict:
    """Everything that decides the pixels of image i (not the image count, batch size or device)."""
    classes = hashlib.sha1("\n".join(args.class_names).encode()).hexdigest()[:12]
    return {"method": run.method, "ratio": run.ratio, **protocol(args), "classes": classes}


# ---------------------------------------------------------------------------------------------
# Generation


def load_pipeline(args):
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            args.model, torch_dtype=DTYPES[args.dtype], safety_checker=None, requires_safety_checker=False
        )
    except Exception as exc:
        sys.exit(
            f"fid.py: error: --model: cannot load {args.model!r} ({type(exc).__name__}: {exc}). "
            "Pass a local folder, or log in / go online for a hub id."
        )
    pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def apply_method(pipe, run: Run, seed: int) -> None:
    """Patch ``pipe`` for ``run`` before every batch, so that its random destination choice repeats.

    tomesd forks the global RNG when first called after a patch (the caller seeds that with
    ``seed + first index of the batch``); agentsd takes ``seed`` and reseeds itself at every UNet call.
    """
    if run.method == "tomesd":
        import tomesd

        tomesd.apply_patch(pipe, ratio=run.ratio)
    elif run.method == "agentsd":
        import agentsd

        agentsd.apply_patch(pipe, ratio=run.ratio, seed=seed)  # reseeded from (seed, timestep) at every UNet call


def remove_method(pipe, run: Run) -> None:
    if run.method != "sd":
        __import__(run.method).remove_patch(pipe)


def prompt_for(args, i: int) -> str:
    """Image i shows class ``i % C``: any prefix of the image list spreads over the classes."""
    return args.prompt.format(args.class_names[i % len(args.class_names)])


def image_path(folder: Path, i: int) -> Path:
    return folder / f"{i:05d}.png"


def generate(pipe, run: Run, args, state) -> None:
    """Make this process's missing images of ``run``, and record how long they took."""
    from tqdm.auto import tqdm

    folder = args.out / "images" / run.name
    folder.mkdir(parents=True, exist_ok=True)
    n, b = args.total, args.batch_size
    batches = [list(range(s, min(s + b, n))) for s in range(0, n, b)]
    mine = [idx for k, idx in enumerate(batches) if k % state.num_processes == state.process_index]
    todo = [idx for idx in mine if not all(image_path(folder, i).exists() for i in idx)]
    cuda = args.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)
    peak = [0]

    def on_step_end(_pipe, _step, _t, _kwargs):
        if cuda:
            peak[0] = torch.cuda.max_memory_allocated(args.device)
        return {}

    extra = (
        {"callback_on_step_end": on_step_end}
        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
        else {}
    )
    records = []
    bar = tqdm(
        total=sum(map(len, todo)),
        desc=f"{run.name} [{state.process_index}]",
        unit="img",
        disable=not todo,
        position=state.process_index,
    )
    try:
        for idx in todo:
            with torch.random.fork_rng(devices=[args.device] if cuda else []):
                torch.manual_seed(args.seed + idx[0])
                apply_method(pipe, run, args.seed)
                prompts = [prompt_for(args, i) for i in idx]
                gens = [torch.Generator("cpu").manual_seed(args.seed + i) for i in idx]
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(args.device)
                    base = peak[0] = torch.cuda.memory_allocated(args.device)
                t0 = time.perf_counter()
                images = pipe(
                    prompt=prompts,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    height=args.height,
                    width=args.width,
                    generator=gens,
                    **extra,
                ).images
                sync()
                seconds = time.perf_counter() - t0
            if cuda and not extra:
                peak[0] = torch.cuda.max_memory_allocated(args.device)
            records.append((idx, seconds, (peak[0] - base) / len(idx) if cuda else None))
            for i, image in zip(idx, images):
                with atomic_path(image_path(folder, i)) as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(idx))
    finally:
        bar.close()
        remove_method(pipe, run)
        timed = records[1:] if len(records) > 1 else records  # the first batch is a warm-up
        if timed:
            full = [m for idx, _, m in timed if m is not None and len(idx) == b]  # a short last batch overstates
            mem = full or [m for _, _, m in timed if m is not None]
            record = {
                "images": sum(len(i) for i, _, _ in timed),
                "seconds": sum(s for _, s, _ in timed),
                "peak_bytes_per_image": max(mem) if mem else None,
                "batch_size": b,
                "device": torch.cuda.get_device_name(args.device) if cuda else str(args.device),
                "process": state.process_index,
                "generated": [i for idx, _, _ in records for i in idx],
            }
            name = f"timing-{time.strftime('%Y%m%d-%H%M%S')}-p{state.process_index}-{os.getpid()}.json"
            with atomic_path(folder / name) as tmp:
                tmp.write_text(json.dumps(record))


def timing(folder: Path) -> dict:
    """s/img and GB/img of an image folder, from all its timing records (None where unmeasured)."""
    recs = [json.loads(f.read_text()) for f in sorted(folder.glob("timing-*.json"))]
    images = sum(r["images"] for r in recs)
    mem = [r["peak_bytes_per_image"] for r in recs if r.get("peak_bytes_per_image") is not None]
    return {
        "sec_per_image": sum(r["seconds"] for r in recs) / images if images else None,
        "gb_per_image": max(mem) / 2**30 if mem else None,
        "timed_images": images,
        "devices": sorted({r["device"] for r in recs}),
    }


# ---------------------------------------------------------------------------------------------
# FID and reports


def evaluate(args, extractor) -> list[dict]:
    """One row per run: FID against the reference and against SD (None without an extractor), timing."""
    sd = Run("sd")
    paths = {run: [image_path(args.out / "images" / run.name, i) for i in range(args.total)] for run in args.runs}
    if sd not in paths:  # SD images of an earlier run with the same settings still serve as the baseline
        folder = args.out / "images" / "sd"
        candidate = [image_path(folder, i) for i in range(args.total)]
        if (
            (folder / "settings.json").is_file()
            and all(p.exists() for p in candidate)
            and json.loads((folder / "settings.json").read_text()) == run_settings(args, sd)
        ):
            paths[sd] = candidate
    ref, stats = None, {}
    if extractor is not None:
        metric = fm.make_metric(extractor, args.device)
        cache, opts = args.out / "cache", dict(batch_size=args.fid_batch_size, workers=args.workers)
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
        stats = {
            run: fm.image_stats(metric, ps, cache=cache / f"{run.name}.npz", desc=f"{run.name} features", **opts)
            for run, ps in paths.items()
        }
    base = timing(args.out / "images" / "sd")["sec_per_image"] if sd in paths else None
    rows = []
    for run in args.runs:
        t = timing(args.out / "images" / run.name)
        paper = PAPER.get((run.method, round(run.ratio, 4)), (None, None, None))
        rows.append(
            {
                "method": run.method,
                "ratio": run.ratio,
                "label": run.label,
                "images": len(paths[run]),
                "fid": fm.frechet_distance(stats[run], ref) if ref is not None else None,
                "fid_vs_sd": fm.frechet_distance(stats[run], stats[sd]) if sd in stats and run != sd else None,
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


def write_reports(args, rows: list[dict], extractor_name: str | None) -> None:
    out = args.out
    meta = {
        **protocol(args),
        "images": args.total,
        "batch_size": args.batch_size,
        "reference": args.reference,
        "feature_extractor": extractor_name,
        "time": "s/img: synchronized wall time of the pipeline calls / images, warm-up batch excluded, per device",
        "memory": "GB/img: (peak allocated during denoising - allocated before the call) / batch size; CUDA only",
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    cols = [
        "method",
        "ratio",
        "images",
        "fid",
        "fid_vs_sd",
        "sec_per_image",
        "speedup_vs_sd",
        "gb_per_image",
        "paper_fid",
        "paper_sec_per_image",
        "paper_gb_per_image",
    ]
    with atomic_path(out / "results.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"FID on {args.total} images ({args.width}x{args.height}, {args.steps} {args.scheduler} steps, "
        f"guidance {args.guidance}, {args.dtype}, model {args.model}); paper: SD v1.5, 2,000 images, RTX 4090.",
        "",
        "| Method | r | FID | FID vs SD | s/img | speed-up | GB/img | paper FID | paper s/img | paper GB/img |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['method']]} | {r['ratio']:g} | {fmt(r['fid'])} | {fmt(r['fid_vs_sd'])} | "
            f"{fmt(r['sec_per_image'], 3)} | {fmt(r['speedup_vs_sd']) + ('x' if r['speedup_vs_sd'] else '')} | "
            f"{fmt(r['gb_per_image'])} | "
            f"{fmt(r['paper_fid'])} | {fmt(r['paper_sec_per_image'])} | {fmt(r['paper_gb_per_image'])} |"
        )
    lines += ["", meta["time"] + ".", meta["memory"] + "."]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(out / "fid_vs_time.png", rows, use_ref=args.reference is not None)


def plot(path: Path, rows: list[dict], use_ref: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "fid" if use_ref else "fid_vs_sd"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        x, y = r["sec_per_image"], r[key] if r[key] is not None else (0.0 if r["method"] == "sd" else None)
        if x is not None and y is not None:
            ax.scatter(x, y, s=50, label=r["label"])
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("seconds per image")
    ax.set_ylabel("FID vs reference" if use_ref else "FID vs SD (same seeds)")
    ax.set_title("FID against time per image (lower left is better)")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, *, feature_extractor: torch.nn.Module | None = None) -> list[dict] | None:
    """Run the experiment. ``feature_extractor`` replaces the Inception network (tests); the rest is the same."""
    from accelerate import PartialState

    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun / accelerate launch without CUDA (or with --device cpu) the processes meet over gloo.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=args.device == "cpu" or (world > 1 and not torch.cuda.is_available()))
    check_args(parser, args, state)
    extractor = None
    if not args.no_fid:
        try:
            if feature_extractor is not None:
                extractor = feature_extractor
            elif not fm.torch_fidelity_available():
                raise fm.FidSetupError(fm.NO_TORCH_FIDELITY)
            elif state.is_main_process:  # may download the weights: before any image is made
                extractor = fm.build_inception(args.inception_weights)
        except fm.FidSetupError as exc:
            parser.error(str(exc))
    if state.is_main_process:
        runs = ", ".join(r.label for r in args.runs)
        print(
            f"fid.py: {runs} | {args.model} | {args.total} images, {args.steps} {args.scheduler} steps, "
            f"guidance {args.guidance}, {args.width}x{args.height}, {args.dtype} on {args.device} x "
            f"{state.num_processes} process(es) | results -> {args.out.resolve()}",
            flush=True,
        )
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
    rows = evaluate(args, extractor)
    write_reports(args, rows, fm.extractor_id(extractor) if extractor is not None else None)
    print((args.out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
