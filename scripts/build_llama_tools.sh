#!/usr/bin/env bash
# Build llama.cpp's tools (llama-imatrix, llama-quantize, llama-perplexity) from the sources
# vendored in the llama-cpp-python sdist: the same llama.cpp as the llama_cpp package installed
# in the venv (qtool's reference library). Into a cache folder OUTSIDE git; nothing from
# llama.cpp is ever committed.
#
# Usage: scripts/build_llama_tools.sh [--static | --src] [TOOL...]
#   TOOL       default: llama-imatrix llama-quantize llama-perplexity
#   (default)  compile llama-common and the tools only, linked against the installed package's
#              libllama/libggml (scripts/llama_tools_shared/CMakeLists.txt): no ggml or llama
#              compile, under a third of the full build's CPU time
#   --static   llama.cpp's own CMake build, ggml and llama compiled in (-DGGML_NATIVE=ON)
#   --src      only fetch the sources (convert_hf_to_gguf.py is there) and print their folder
#
# Environment:
#   PYTHON             the venv's python [default: .venv/bin/python, else python3]
#   QTOOL_LLAMA_SRC    llama.cpp sources [default: ~/.cache/qtool/llama-src/llama_cpp_python-
#                      VERSION/vendor/llama.cpp, fetched with pip download and unpacked when missing]
#   QTOOL_LLAMA_BUILD  build folder [default: ~/.cache/qtool/llama-build]
#   JOBS               parallel compiles [default: nproc]
#
# Each recipe (version, mode, sources, library folder, the CMake recipe's hash) builds in its own
# subfolder, MODE-VERSION-HASH, with a stamp written once its tools are built: a second run finds
# them and returns at once (a no-op), several venvs keep their own builds, a changed recipe builds
# afresh. Prints the folder holding the tools on stdout (last line); everything else goes to
# stderr. Measured on 2 busy cores (load 4 to 7): shared 4 to 7 min (about 250 s of CPU),
# --static 17 to 28 min (680 to 850 s of CPU).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$HOME/.cache/qtool"
MODE=shared
TOOLS=()
for arg in "$@"; do
    case "$arg" in
        --static) MODE=static ;;
        --src) MODE=src ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        -*) echo "error: unknown option $arg" >&2; exit 2 ;;
        *) TOOLS+=("$arg") ;;
    esac
done
[ ${#TOOLS[@]} -gt 0 ] || TOOLS=(llama-imatrix llama-quantize llama-perplexity)

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x "$REPO/.venv/bin/python" ] && PYTHON="$REPO/.venv/bin/python"
fi
# The installed llama-cpp-python: its version picks the sdist, its lib/ the shared libraries.
read -r VERSION LIBDIR < <("$PYTHON" - <<'EOF'
import importlib.metadata, importlib.util, pathlib
spec = importlib.util.find_spec("llama_cpp")
if spec is None or spec.origin is None:
    raise SystemExit("error: llama_cpp is not installed (pip install -e '.[dev]')")
print(importlib.metadata.version("llama-cpp-python"), pathlib.Path(spec.origin).parent / "lib")
EOF
)
[ -n "${LIBDIR:-}" ] || exit 2
BUILD="${QTOOL_LLAMA_BUILD:-$CACHE/llama-build}"
SRC="${QTOOL_LLAMA_SRC:-$CACHE/llama-src/llama_cpp_python-$VERSION/vendor/llama.cpp}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
RECIPE="$REPO/scripts/llama_tools_shared/CMakeLists.txt"

inside_git() {  # is $1 (which may not exist yet) inside this git work tree?
    local top dir
    top="$(git -C "$REPO" rev-parse --show-toplevel 2>/dev/null)" || return 1
    dir="$(realpath -m "$1")"
    case "$dir/" in "$top"/*) return 0 ;; esac
    return 1
}
for d in "$BUILD" "$SRC"; do
    if inside_git "$d"; then
        echo "error: $d is inside the git work tree; choose a folder outside it" >&2
        exit 2
    fi
done

# One fetch of the sources and one build at a time (test workers and sessions may start
# together), each under its own lock: a caller that needs only the sources (--src, the
# converter tests) never waits for a build.
lock() {  # lock FD FILE: hold FILE's lock on file descriptor FD until it is closed
    command -v flock >/dev/null || return 0
    eval "exec $1>\"\$2\""
    flock "$1"
}

# The sources: the llama-cpp-python sdist from PyPI, unpacked next to the build folder.
top="$CACHE/llama-src"
if [ ! -f "$SRC/CMakeLists.txt" ] && [ -z "${QTOOL_LLAMA_SRC:-}" ]; then
    mkdir -p "$top"
    lock 8 "$top/.lock"
fi
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    if [ -n "${QTOOL_LLAMA_SRC:-}" ]; then
        echo "error: no llama.cpp sources at QTOOL_LLAMA_SRC=$SRC" >&2
        exit 2
    fi
    tmp="$(mktemp -d "$top/.fetch.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching the llama-cpp-python $VERSION sdist into $top" >&2
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
        -d "$tmp" >&2
    tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
    rm -rf "$top/llama_cpp_python-$VERSION"
    mv "$tmp/llama_cpp_python-$VERSION" "$top/"
    rm -rf "$tmp"
    trap - EXIT
    [ -f "$SRC/CMakeLists.txt" ] || { echo "error: the sdist has no $SRC" >&2; exit 2; }
fi
exec 8>&-  # the sources are complete: release their lock
if [ "$MODE" = src ]; then
    echo "$SRC"
    exit 0
fi
mkdir -p "$BUILD"
lock 9 "$BUILD/.lock"

# One subfolder per recipe: what the tools are built from and (shared) linked against, so venvs
# of several work trees each keep their own build. Its stamp is written once the tools are built.
STAMP_TEXT="llama-cpp-python $VERSION | $MODE | src $SRC"
if [ "$MODE" = shared ]; then
    [ -d "$LIBDIR" ] || { echo "error: no $LIBDIR (llama_cpp's shared libraries)" >&2; exit 2; }
    STAMP_TEXT+=" | libs $LIBDIR | recipe $(sha256sum "$RECIPE" | cut -c1-16)"
fi
OUT="$BUILD/$MODE-$VERSION-$(printf '%s' "$STAMP_TEXT" | sha256sum | cut -c1-12)"
STAMP="$OUT/qtool-llama-tools.stamp"
missing=()
for t in "${TOOLS[@]}"; do [ -x "$OUT/bin/$t" ] || missing+=("$t"); done
if [ -f "$STAMP" ] && [ ${#missing[@]} -eq 0 ]; then
    echo "$OUT/bin"
    exit 0
fi
mkdir -p "$OUT"
rm -f "$STAMP"

# cmake and ninja: the venv's (dev extras) first, else the system's; make without ninja.
VENV_BIN=""
case "$PYTHON" in */*) VENV_BIN="$(dirname "$PYTHON")" ;; esac
tool() { [ -n "$VENV_BIN" ] && [ -x "$VENV_BIN/$1" ] && echo "$VENV_BIN/$1" || command -v "$1" || true; }
CMAKE="$(tool cmake)"
[ -n "$CMAKE" ] || { echo "error: no cmake (pip install -e '.[dev]' installs one)" >&2; exit 2; }
NINJA="$(tool ninja)"
GEN=()
[ -n "$NINJA" ] && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA")

echo "building ${TOOLS[*]} ($MODE) into $OUT" >&2
if [ "$MODE" = shared ]; then
    "$CMAKE" -S "$REPO/scripts/llama_tools_shared" -B "$OUT" "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_SRC="$SRC" -DLLAMA_LIB_DIR="$LIBDIR" \
        -DQTOOL_LLAMA_LABEL="llama-cpp-python-$VERSION" >&2
else
    "$CMAKE" -S "$SRC" -B "$OUT" "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DGGML_NATIVE=ON >&2
fi
"$CMAKE" --build "$OUT" --config Release -j "$JOBS" --target "${TOOLS[@]}" >&2
if [ "$MODE" = shared ]; then
    # The tools run against the installed package's libraries: check they load.
    "$OUT/bin/${TOOLS[0]}" --version >&2 2>&1 || {
        echo "error: $OUT/bin/${TOOLS[0]} does not run against $LIBDIR" >&2
        exit 1
    }
fi
echo "$STAMP_TEXT" >"$STAMP"
echo "$OUT/bin"
