"""Speed of the AgentSD node inside ComfyUI: one model forward, unpatched vs ComfyUI's ToMe vs AgentSD.

Run, with the package and the ComfyUI engine installed (README: the test command's installs)::

    python eval/comfyui_speed.py                              # SD 1.5 layout, 1024 px, CPU fp32, batch 2
    python eval/comfyui_speed.py --attention comfyui              # ComfyUI's own choice of attention
    python eval/comfyui_speed.py --resolutions 1024 2048 --device cuda --dtype float16
    python eval/comfyui_speed.py --model flux --blocks 2 4 --device cuda --dtype bfloat16 --batch 1
    python eval/comfyui_speed.py --model sd3.5-medium --device cuda --dtype bfloat16

``--model sd3.5-medium`` is ComfyUI's SD3 model in SD3.5 Medium's layout (its key map loads no
full-width MMDiT with fewer blocks), ``--model flux`` its Flux at full width (24 heads of 128) with
``--blocks`` double and single blocks; random weights, beside their diffusers twins with the same
weights (eval/comfy_dits.py). Their methods (``comfy_dits.DIT_METHODS``) are the unpatched model and the
node's recipe in each phase (``agentsd-agents`` at sigma 0.9, ``agentsd-tome`` at 0.3), and the diffusers
patch likewise, so that the node's ratios and the diffusers patch's are measured on one machine.

The model is ComfyUI's own SD 1.5 UNet (the full layout, random weights, loaded through ComfyUI's
UNet loader); each method is a model patch on a clone of it, applied by its node's own code:

* ``comfyui``: the unpatched model (``--attention``: SDPA by default, or what ComfyUI picks);
* ``comfyui-tome``: ComfyUI's built-in ToMe node (``TomePatchModel``) at ``--ratio``;
* ``agentsd``: the AgentSD node at ``--ratio``, its agent phase (the forward runs at ``--timestep``,
  981 by default, inside the recipe's agent phase: that is what the recipe runs there).

One forward on the guidance batch (``--batch``) of random latents of ``resolution / 8`` and random
text embeddings, timed after ``--warmup`` calls; methods interleaved within each repeat, in
alternating order, so that a drift of the machine hits every method alike. Medians with min-max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_dits  # noqa: E402
import comfy_engine  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
from shared import DTYPES, HelpFormatter  # noqa: E402

METHODS = ("comfyui", "comfyui-tome", "agentsd")
WHO = "comfyui_speed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024], help="image sizes in pixels (square)")
    parser.add_argument("--methods", nargs="+", choices=METHODS + comfy_dits.DIT_METHODS, help="methods to time")
    parser.add_argument("--model", choices=("sd1.5", "sd3.5-medium", "flux"), default="sd1.5", help="model family")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="Flux's double and single blocks")
    parser.add_argument("--ratio", type=float, default=0.4, help="merge ratio of ToMe and AgentSD")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (the guidance pair of one image)")
    parser.add_argument("--timestep", type=int, default=981, help="timestep of the timed forwards")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method and resolution")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and resolution")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where ComfyUI runs")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the model's weights")
    parser.add_argument(
        "--attention",
        choices=("comfyui", "pytorch"),
        default="pytorch",
        help="the unpatched attention: pytorch is ComfyUI's --use-pytorch-cross-attention (SDPA, as diffusers "
        "runs it); comfyui is what ComfyUI picks for the device (sub-quadratic attention on the CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--layout",
        choices=(*comfy_engine.SD15_LAYOUTS, "tiny"),
        default="full",
        help="UNet layout (DiTs: tiny or full)",
    )
    return parser


def patched_models(model: Any, methods: Sequence[str], ratio: float) -> dict[str, Any]:
    """Each method's clone of ``model``, made by its node's own code."""
    from comfy_extras.nodes_tomesd import TomePatchModel

    from agentsd.comfy_patch.node import AgentSDNode

    made = {}
    for method in methods:
        if method == "comfyui":
            made[method] = model.clone()
        elif method == "comfyui-tome":
            (made[method],) = TomePatchModel.execute(model, ratio)
        else:
            (made[method],) = AgentSDNode().patch(
                model,
                ratio=ratio,
                schedule="agent phase only",
                agent_ratio=0.8,
                sx=2,
                sy=2,
                max_downsample="auto",
                use_rand=True,
                seed=0,
                fp32_attention=False,
            )
    return made


def time_resolution(
    models: dict[str, Any], resolution: int, args: argparse.Namespace, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per UNet forward of each method at ``resolution``: ``args.repeats`` interleaved calls each."""
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    side = resolution // 8
    x = torch.randn(args.batch, 4, side, side, generator=generator).to(device, dtype)
    width = next(iter(models.values())).model.model_config.unet_config["context_dim"]
    context = torch.randn(args.batch, 77, width, generator=generator).to(device, dtype)

    def make(method: str) -> Callable[[], torch.Tensor]:
        return comfy_engine.unet_call(models[method], x, context, args.timestep)

    return interleaved(tuple(models), make, resolution, args, device)


def interleaved(
    methods: Sequence[str],
    make: Callable[[str], Callable[[], torch.Tensor]],
    resolution: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds per call of each method (``make(method)`` gives its call, ready to run), ``args.warmup``
    untimed calls each, then ``args.repeats`` rounds in alternating order, so that a drift of the machine
    hits every method alike."""
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    calls: dict[str, Callable[[], torch.Tensor]] = {}

    def run(method: str) -> float:
        if method not in calls:  # loading a ComfyUI clone unloads the previous one: one call object at a time
            calls.clear()
            calls[method] = make(method)
        return timing.timed(calls[method], device)

    for method in methods:
        for _ in range(args.warmup):
            run(method)
    timing.warn_if_busy(WHO, f"before the timed calls at {resolution} px")
    for repeat in range(args.repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for method in order:
            seconds[method].append(run(method))
            print(f"  {resolution} px, repeat {repeat + 1}: {method} {seconds[method][-1]:.2f} s", flush=True)
    timing.warn_if_busy(WHO, f"after the timed calls at {resolution} px")
    return seconds


def report(resolution: int, seconds: dict[str, list[float]], bases: tuple[str, ...] = ("comfyui",)) -> list[str]:
    """Markdown rows: method, median s/forward (min-max), speed-up over its engine's unpatched model
    (``bases``: the unpatched methods; ``diffusers`` is the base of the diffusers methods, the first the others')."""
    rows = [f"| method @ {resolution} px | s/forward | vs {' / '.join(bases)} |", "|---|---|---|"]
    for method, values in seconds.items():
        median = statistics.median(values)
        base = "diffusers" if method.startswith("diffusers") and "diffusers" in bases else bases[0]
        base = base if base in seconds else None
        speedup = f"{statistics.median(seconds[base]) / median:.2f}x" if base else "-"
        rows.append(f"| {method} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {speedup} |")
    return rows


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, list[float]]]:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("--repeats must be at least 1, --warmup at least 0, --batch at least 1")
    if any(resolution < 64 or resolution % 64 for resolution in args.resolutions):
        raise SystemExit(f"--resolutions must be multiples of 64 pixels, got {args.resolutions}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    comfy_engine.load_engine(cpu=args.device == "cpu", pytorch_attention=args.attention == "pytorch")
    device = torch.device(args.device)
    timing.warn_if_busy(WHO, "before the model is built")
    if args.model != "sd1.5":
        return time_dit(args, device)
    model = comfy_engine.random_sd15(args.layout, seed=0, dtype=DTYPES[args.dtype])
    models = patched_models(model, args.methods or METHODS, args.ratio)
    results = {}
    for resolution in args.resolutions:
        results[resolution] = time_resolution(models, resolution, args, device)
        print("\n".join(report(resolution, results[resolution])), flush=True)
    return results


def time_dit(args: argparse.Namespace, device: torch.device) -> dict[int, dict[str, list[float]]]:
    """The DiT methods at each resolution: one forward each, interleaved as for UNets."""
    kind = "flux" if args.model == "flux" else "sd3"
    layout = "tiny" if args.layout == "tiny" else "full"
    sizes = dict(zip(("double", "single"), args.blocks or [1, 1])) if kind == "flux" else {}
    model, twin = comfy_dits.random_dit(kind, layout, dtype=DTYPES[args.dtype], **sizes)
    twin.to(device)
    methods = tuple(args.methods or comfy_dits.DIT_METHODS)
    results = {}
    for resolution in args.resolutions:
        side = resolution // 8
        x = torch.randn(args.batch, 16, side, side, generator=torch.Generator().manual_seed(0)).to(
            device, DTYPES[args.dtype]
        )
        make = comfy_dits.dit_calls(kind, model, twin, x, args.ratio, methods)
        results[resolution] = interleaved(methods, make, resolution, args, device)
        print("\n".join(report(resolution, results[resolution], ("comfyui", "diffusers"))), flush=True)
    return results


if __name__ == "__main__":
    main()
