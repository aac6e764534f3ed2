"""How long torch.compile takes on a patched UNet against the unpatched one (issue 18.7).

    python benchmarks/compile_time.py            # tiny SD 1.x and SDXL UNets, regional and whole model

Each case runs in a fresh process (no dynamo or inductor cache carried over: the FX graph and
autotune caches are off), compiles with inductor, and reports the first call (trace + compile + run)
minus a later call (run), median of ``--repeats`` processes. The tiny UNets of the test suite are
used: their compile time is all tracing and code generation, which is what a patch adds to.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_case(kind: str, mode: str, patched: bool) -> float:
    """Seconds of compilation for one (kind, mode, patched) case, in this process."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import torch._inductor.config as inductor_config
    from tiny import TEXT_DIM, tiny_unet

    import agentsd

    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    torch.set_num_threads(1)
    unet = tiny_unet(kind).eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, (2 if kind == "sdxl" else 1) * TEXT_DIM, generator=g)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, TEXT_DIM), "time_ids": torch.randn(2, 6)}
    if patched:
        agentsd.apply_patch(unet, ratio=0.4)
    if mode == "regional":
        unet.compile_repeated_blocks(fullgraph=True)
        model = unet
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
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # kind,mode,patched: run one case and print seconds
    args = parser.parse_args()
    if args.case:
        kind, mode, patched = args.case.split(",")
        print(json.dumps(one_case(kind, mode, patched == "1")))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print("| UNet | compile | unpatched (s) | patched (s) | patched / unpatched |\n|---|---|---|---|---|")
    for kind in ("sd1", "sdxl"):
        for mode in ("regional", "whole"):
            seconds = {}
            for patched in ("0", "1"):
                runs = [
                    float(
                        subprocess.run(
                            [sys.executable, __file__, "--case", f"{kind},{mode},{patched}"],
                            check=True,
                            capture_output=True,
                            text=True,
                            env=env,
                        )
                        .stdout.strip()
                        .splitlines()[-1]
                    )
                    for _ in range(args.repeats)
                ]
                seconds[patched] = statistics.median(runs)
            print(
                f"| {kind} | {mode} | {seconds['0']:.1f} | {seconds['1']:.1f} | {seconds['1'] / seconds['0']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
