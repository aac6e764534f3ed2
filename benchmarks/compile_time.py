"""How long torch.compile takes on a patched UNet against the unpatched one.

    python benchmarks/compile_time.py                        # tiny SD 1.x and SDXL UNets of the tests
    python benchmarks/compile_time.py --unets sd15 sdxl      # full-size architectures, random weights

Modes: ``regional`` (``compile_repeated_blocks(fullgraph=True)``), ``whole`` (``torch.compile(unet,
fullgraph=True)``) and ``compile-unet`` (patched: ``agentsd.compile_unet(unet, fullgraph=True)``, a graph
per phase; unpatched: as ``whole``).

Each case runs in a fresh process with an empty inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``:
the kernels compiled by an earlier run, which inductor keeps on disk across processes, would otherwise
make a rerun several seconds faster than a user's first compile; the FX graph and autotune caches are
off too), compiles with inductor, and reports the first calls at both phases (trace
+ compile + run) minus the same calls again (run), median of ``--repeats`` processes. The tiny UNets'
compile time is all tracing and code generation, which is what a patch adds to; the full-size ones
(``eval/unet_configs.py``, at ``--resolution``, which changes the run but not the code generated)
show the ratio a user compiling SD 1.5 or SDXL gets, where the patched blocks are a smaller part of
the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


TINY = {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"}
FULL_SIZE = ("sd15", "sdxl")


def one_case(unet_name: str, mode: str, patched: bool, resolution: int) -> float:
    """Seconds of compilation for one (UNet, mode, patched) case, in this process."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "eval")]
    import torch
    import torch._inductor.config as inductor_config
    import workloads

    import agentsd

    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    torch.set_num_threads(1)
    if unet_name in TINY:
        from tiny import tiny_unet

        unet, resolution = tiny_unet(TINY[unet_name]).eval(), 128  # a 16 x 16 latent
    else:
        from unet_configs import ARCHS

        unet = ARCHS[unet_name].build_unet()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, resolution // 8, resolution // 8, generator=g)
    kwargs = workloads.unet_conditioning(unet, 2, resolution, g)
    if patched:
        agentsd.apply_patch(unet, ratio=0.4)
    if mode == "regional":
        unet.compile_repeated_blocks(fullgraph=True)
        model = unet
    elif mode == "compile-unet" and patched:
        model = agentsd.compile_unet(unet, fullgraph=True)
    else:
        model = torch.compile(unet, fullgraph=True)

    def call(t: float) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(sample, torch.tensor(t), **kwargs)
        return time.perf_counter() - start

    # Both phases of the recipe: regional compilation traces each block once per phase.
    first = call(981.0) + call(581.0)
    run = call(961.0) + call(561.0)
    return first - run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--unets", nargs="+", choices=[*TINY, *FULL_SIZE], default=list(TINY), help="default: the two tiny UNets"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["regional", "whole", "compile-unet"], default=["regional", "whole"]
    )
    parser.add_argument("--resolution", type=int, default=256, help="image side in px of the full-size UNets' calls")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # unet,mode,patched: run one case and print seconds
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"argument --repeats: must be at least 1, got {args.repeats}")
    if args.resolution <= 0 or args.resolution % 64:
        parser.error(f"argument --resolution: a positive multiple of 64 px, got {args.resolution}")
    if args.case:
        unet_name, mode, patched = args.case.split(",")
        print(json.dumps(one_case(unet_name, mode, patched == "1", args.resolution)))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print("| UNet | compile | unpatched (s) | patched (s) | patched / unpatched |\n|---|---|---|---|---|")
    for unet_name in args.unets:
        for mode in args.modes:
            seconds = {}
            for patched in ("0", "1"):
                case = [sys.executable, __file__, "--case", f"{unet_name},{mode},{patched}"]
                case += ["--resolution", str(args.resolution)]
                runs = []
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory(prefix="agentsd-inductor-") as cache:
                        cold = env | {"TORCHINDUCTOR_CACHE_DIR": cache}
                        done = subprocess.run(case, check=True, capture_output=True, text=True, env=cold)
                    runs.append(float(done.stdout.strip().splitlines()[-1]))
                seconds[patched] = statistics.median(runs)
            print(
                f"| {unet_name} | {mode} | {seconds['0']:.1f} | {seconds['1']:.1f} | "
                f"{seconds['1'] / seconds['0']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
