#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix, llama-quantize and llama-perplexity from the sources vendored
# in the llama-cpp-python sdist (the same llama.cpp qtool's reference library is built from), into
# a build folder OUTSIDE git. Nothing from llama.cpp is ever committed.
#
# Usage: scripts/build_llama_tools.sh [LLAMA_SRC] [BUILD_DIR]
#   LLAMA_SRC  default /tmp/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp
#              (unpack it with: pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
#               && tar xzf llama_cpp_python-0.3.36.tar.gz -C /tmp/llama-src)
#   BUILD_DIR  default ${QTOOL_LLAMA_BUILD:-$HOME/.cache/qtool/llama-build}
# Prints the folder holding the binaries on stdout (last line). CPU build, Release, no curl.
set -euo pipefail

SRC="${1:-${QTOOL_LLAMA_SRC:-/tmp/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp}}"
BUILD="${2:-${QTOOL_LLAMA_BUILD:-$HOME/.cache/qtool/llama-build}}"
JOBS="${JOBS:-$(nproc)}"

if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "error: no llama.cpp sources at $SRC (unpack the llama-cpp-python 0.3.36 sdist there)" >&2
    exit 2
fi
case "$(cd "$(dirname "$BUILD")" 2>/dev/null && pwd)/" in
    "$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || echo /nonexistent)"/*)
        echo "error: build folder $BUILD is inside the git work tree; choose one outside it" >&2
        exit 2
        ;;
esac

mkdir -p "$BUILD"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DGGML_NATIVE=ON >&2
cmake --build "$BUILD" --config Release -j "$JOBS" \
    --target llama-imatrix llama-quantize llama-perplexity >&2
echo "$BUILD/bin"
