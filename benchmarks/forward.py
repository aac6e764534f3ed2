"""Whole UNet forwards with AgentSD knob variants that ``eval/speed.py`` has no flags for.

    python benchmarks/forward.py --resolution 2048 --sd --agentsd max_downsample=1 max_downsample=2

Each ``--agentsd KNOBS`` (as in ``benchmarks/block.py``: one fixed phase, ratio 0.4 unless given)
is applied in turn to one UNet of ``--arch`` with random weights, and the same forward (batch 2,
t = 981, ``eval/speed.py``'s inputs) is timed, the variants interleaved and their order reversed
every round; medians are printed with their ranges and the speed-up over the first variant
(``--sd``: the unpatched UNet, timed first, in the same rounds). Use it where a knob changes the
whole forward, not one block: ``max_downsample`` merges more levels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from block import agentsd_knobs, knobbed, knobs_label

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
import timing  # noqa: E402
import workloads  # noqa: E402
from unet_configs import ARCHS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in px (latent: / 8)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per variant (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--sd", action="store_true", help="time the unpatched UNet too, as the first variant (the baseline)"
    )
    parser.add_argument(
        "--agentsd", type=agentsd_knobs, nargs="+", required=True, metavar="KNOBS", help="e.g. max_downsample=2,sx=4"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"argument --repeats: must be at least 1, got {args.repeats}")
    if args.resolution <= 0 or args.resolution % 8:
        parser.error(f"argument --resolution: a positive multiple of 8 px, got {args.resolution}")
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = ARCHS[args.arch].build_unet()
    # eval/speed.py's UNet forward: seeded latents and text embeddings, batch 2, t = 981.
    workload = workloads.unet_workload(unet, args.resolution, vae_factor=8, batch=2, timestep=981)
    # None: the unpatched UNet.
    variants: list[tuple[str, dict | None]] = [("sd", None)] if args.sd else []
    variants += [(knobs_label(knobs), knobs) for knobs in args.agentsd]
    labels = [label for label, _ in variants]
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    with torch.no_grad():
        for round_ in range(args.repeats):
            for label, knobs in variants if round_ % 2 == 0 else variants[::-1]:
                with knobbed(unet, knobs):
                    seconds[label].append(timing.timed(lambda: workload.call(unet, False), unet.device))
                print(f"{label}: {seconds[label][-1]:.2f} s", flush=True)
    first = statistics.median(seconds[labels[0]])
    print(f"\n{args.arch} at {args.resolution} px, batch 2, t = 981, s per forward, median of {args.repeats}:")
    print("| variant | s | min-max | vs first |\n|---|---|---|---|")
    for label in labels:
        median = statistics.median(seconds[label])
        print(
            f"| {label} | {median:.2f} | {min(seconds[label]):.2f}-{max(seconds[label]):.2f} | {first / median:.2f}x |"
        )


if __name__ == "__main__":
    main()
