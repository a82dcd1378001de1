#!/usr/bin/env bash
# Issue 19 on a lent GPU machine: the CUDA engine from the carried patched source, the 8B model, then bench/split.py and
# bench/rpc_per_token.py, all in the background (setsid) so a second call can follow it; logs under /tmp/out.
# Carry a folder (e.g. .dev/rpc) holding llama-src.tar.xz (the pinned llama.cpp source with the patches applied,
# big folders left out: see bench/README.md), whl/ (meshllm's dependencies as wheels) and tree/ (this checkout);
# copy this script there and run it with setsid in one call, then follow /tmp/out/run.log in the next.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/out /tmp/src /tmp/models
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$D"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$D/tree
tar xJf "$D/llama-src.tar.xz" -C /tmp/src
(cd "$D/tree" && python3 -m meshllm.engine.tinygguf --preset 8b -o /tmp/models/synthetic-8b-f16.gguf > /tmp/out/gen.log 2>&1) &
F="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
t0=$(date +%s)
cmake -S /tmp/src/llama.cpp -B /tmp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF "-DCMAKE_C_FLAGS=$F" "-DCMAKE_CXX_FLAGS=$F" \
  > /tmp/out/cmake.log 2>&1 || { tail -30 /tmp/out/cmake.log; exit 1; }
cmake --build /tmp/build --target llama-server ggml-rpc-server llama-gguf-split -j "$(nproc)" > /tmp/out/build.log 2>&1 \
  || { tail -40 /tmp/out/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
wait
cat /tmp/out/gen.log | tail -2
cd "$D/tree"
export MESHLLM_ENGINE_DIR=/tmp/build/bin
python3 bench/rpc_per_token.py --gpu --n1 16 --n2 144 /tmp/models/synthetic-8b-f16.gguf > /tmp/out/per-token.txt 2>&1
python3 bench/split.py --gpu --rounds "${ROUNDS:-2}" --requests 2 --no-stock-bytes --model-dir /tmp/models \
  --modes "${MODES:-solo,stock-2,stock-3,meshllm-2,meshllm-2-direct,meshllm-3,meshllm-2-tunnel}" 8b > /tmp/out/split.txt 2>&1
echo ALL DONE
} > /tmp/out/run.log 2>&1
