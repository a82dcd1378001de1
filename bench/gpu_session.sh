#!/usr/bin/env bash
# The GPU rows of issues 19 and 20 in one lease of a lent machine (no internet there): the CUDA engine from the
# carried patched source, then bench/moe_gpu.sh on a synthetic model of Qwen3-30B-A3B's shape, then
# bench/rpc_per_token.py and bench/split.py on the 8B-shaped model. Run from the checkout's root with setsid, so a
# later call can follow /tmp/out/run.log (see bench/README.md, "GPU rows in one lease"):
#   setsid bash bench/gpu_session.sh .dev/rpc &
# DEV holds llama-src.tar.xz (the pinned source with llama.cpp/patches applied, big folders left out) and whl/
# (meshllm's dependencies as wheels for the machine's Python). STEPS picks the parts (default "moe split").
# bench/patches/rpc-timing.patch goes on top: the worker's time per command type for rpc_per_token.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
DEV=$(cd "${1:?usage: gpu_session.sh DEV_FOLDER}" && pwd)
ROOT=$PWD
STEPS=${STEPS:-moe split}
mkdir -p /tmp/out /tmp/src /tmp/models
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEV"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$ROOT
tar xJf "$DEV/llama-src.tar.xz" -C /tmp/src
# the worker's time per command type, for rpc_per_token.py (counted only where GGML_RPC_STATS is set)
(cd /tmp/src && patch -s -p1 < "$ROOT/bench/patches/rpc-timing.patch") || exit 1
F="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
t0=$(date +%s)
cmake -S /tmp/src/llama.cpp -B /tmp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF "-DCMAKE_C_FLAGS=$F" "-DCMAKE_CXX_FLAGS=$F" \
  > /tmp/out/cmake.log 2>&1 || { tail -30 /tmp/out/cmake.log; exit 1; }
cmake --build /tmp/build --target ${TARGETS:-llama-server ggml-rpc-server llama-gguf-split} -j "$(nproc)" > /tmp/out/build.log 2>&1 \
  || { tail -40 /tmp/out/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export MESHLLM_ENGINE_DIR=/tmp/build/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ $STEPS == *moe* ]]; then
    ENGINE=/tmp/build/bin OUT=/tmp/out LAYERS=${LAYERS:-16} bash bench/moe_gpu.sh > /dev/null 2>&1
    echo "moe done"
    rm -rf /tmp/moe-bench
fi
if [[ $STEPS == *split* ]]; then
    python3 -m meshllm.engine.tinygguf --preset 8b -o /tmp/models/synthetic-8b-f16.gguf > /tmp/out/gen.log 2>&1
    tail -2 /tmp/out/gen.log
    # PT_RUNS: the per-token runs, their extra arguments separated by ";" (per-token-1.txt, -2, ...)
    IFS=';' read -ra runs <<< "${PT_RUNS:---solo --n1 16 --n2 144 --paths stock,clear,sealed}"
    i=0
    for args in "${runs[@]}"; do
        i=$((i + 1))
        # shellcheck disable=SC2086  # each run's arguments are words
        python3 bench/rpc_per_token.py --gpu $args /tmp/models/synthetic-8b-f16.gguf > "/tmp/out/per-token-$i.txt" 2>&1
        echo "per-token $i done: $args"
    done
    python3 bench/split.py --gpu --rounds "${ROUNDS:-2}" --requests "${REQUESTS:-2}" --tokens "${TOKENS:-64}" \
      --no-stock-bytes --model-dir /tmp/models \
      --modes "${MODES:-solo,stock-2,stock-3,meshllm-2,meshllm-2-direct,meshllm-3,meshllm-2-tunnel}" 8b \
      > /tmp/out/split.txt 2>&1
    echo "split done"
    rm -f /tmp/models/*.gguf
fi
echo ALL DONE
} > /tmp/out/run.log 2>&1
