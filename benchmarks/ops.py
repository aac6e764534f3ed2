"""ATen operations per UNet forward, per method: what a GPU pays for in eager mode at small sizes.

    python benchmarks/ops.py --arch sd15 --methods sd tomesd todo agent-phase tome-phase ceiling

On a GPU a forward of the SD 1.5 UNet at 512-1024 px takes 30-40 ms in fp16 and is bound by the host
launching its kernels one by one (BENCHMARKS.md, CUDA): every operation a method adds costs about
as much host time there whatever its size. This counts them, on the CPU, with a dispatch mode over
one forward (batch 2, t = 981, ``eval/speed.py``'s inputs): each method's total, what it adds to the
unpatched UNet, and the kinds it adds most of. Views (``view``, ``slice``, ``expand``) are counted:
they launch no kernel but cost host time. CUDA graphs (``mode="reduce-overhead"``) remove this cost.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "eval"), str(ROOT / "tests")]
import workloads  # noqa: E402
from methods import METHODS  # noqa: E402
from op_counter import CountOps  # noqa: E402
from unet_configs import ARCHS  # noqa: E402

RATIO = 0.4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--resolution", type=int, default=512, help="image side in px (latent: / 8)")
    unet_methods = sorted(name for name, method in METHODS.items() if not method.needs_pipeline)
    parser.add_argument("--methods", nargs="+", choices=unet_methods, default=["sd", "agent-phase"], metavar="NAME")
    parser.add_argument("--top", type=int, default=8, help="operation kinds listed per method")
    args = parser.parse_args()
    if args.resolution <= 0 or args.resolution % 8:
        parser.error(f"argument --resolution: a positive multiple of 8 px, got {args.resolution}")
    unet = ARCHS[args.arch].build_unet()
    workload = workloads.unet_workload(unet, args.resolution, vae_factor=8, batch=2, timestep=981)
    counts: dict[str, collections.Counter[str]] = {}
    with torch.inference_mode():
        for name in ["sd", *(m for m in args.methods if m != "sd")]:
            method = METHODS[name]
            ratio = RATIO if method.uses_ratio else None
            with method.applied(unet, ratio=ratio, seed=workloads.SEED) as generate:
                workload.call(generate, False)  # the first call builds what later calls reuse
                counter = CountOps()
                with counter:
                    workload.call(generate, False)
            counts[name] = counter.ops
    base = sum(counts["sd"].values())
    print(f"{args.arch}, {args.resolution} px, one forward: ATen operations (added to sd's {base})")
    for name, ops in counts.items():
        added = ops - counts["sd"]
        kinds = ", ".join(f"{kind} {n}" for kind, n in added.most_common(args.top))
        print(f"{name:14s} {sum(ops.values()):6d} {sum(ops.values()) - base:+6d}  {kinds}")


if __name__ == "__main__":
    main()
