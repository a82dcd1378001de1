#!/usr/bin/env bash
# bench/moe.py on a lent GPU machine with a synthetic MoE of Qwen3-30B-A3B's shape (2048 wide, 128 experts of 768,
# 8 used, 151,936-token vocabulary, 16 query heads as tinygguf's 30b-a3b preset) and LAYERS of its 48 layers
# (default 16: 20.8 GB in F16, a shard 14.4 GB; the whole 48 layers, 60 GB, leave no room for a shard on a 64 GB
# disk). Needs a CUDA engine (ENGINE, default the one bench/gpu_split.sh builds under /tmp/mc) and meshllm's
# dependencies on PYTHONPATH (/tmp/site, as bench/gpu_split.sh installs them).
#   LAYERS=16 bash bench/moe_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
eng=${ENGINE:-$(ls -d /tmp/mc/engine/*-cuda-*/bin 2>/dev/null | head -1)}
[ -x "$eng/llama-server" ] || { echo "no CUDA llama-server: build the engine first (bench/gpu_split.sh, about 5 minutes)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD MESHLLM_ENGINE_DIR=$eng
python3 bench/moe.py --ngl 99 --threads 8 --layers "${LAYERS:-16}" --embd 2048 --ff 768 --heads 16 --kv-heads 4 \
    --experts 128 --used 8 --vocab 151936 --shards 3 --measure-shards "${MEASURE:-1}" --tokens "${TOKENS:-128}" \
    --out /tmp/moe-bench 2>&1 | tee "${OUT:-/tmp}/moe-gpu.log"
