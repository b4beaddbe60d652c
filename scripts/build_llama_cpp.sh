#!/usr/bin/env bash
# Builds llama.cpp's CPU tools for side-by-side benchmarks and quality checks (docs/PERFORMANCE.md):
# llama-server, llama-quantize, llama-perplexity, llama-bench and llama-batched-bench.
#
#   scripts/build_llama_cpp.sh [DEST]      (default DEST: ~/.cache/baichuan2/llama.cpp)
#
# The sources are the llama.cpp vendored in PyPI's llama-cpp-python sdist (pinned below), so the build needs only
# PyPI; Release, native CPU flags, static libraries, no network features (this llama.cpp has no CURL option
# left; OpenSSL and the downloaded web UI are turned off). The binaries land in DEST/llama-cpp-python-<pin>/bin;
# a second run with the same pin only prints that directory. Not part of `make test`: CI never builds it.
set -euo pipefail

PIN="0.3.36"                      # llama-cpp-python version whose vendor/llama.cpp is built
TOOLS=(llama-server llama-quantize llama-perplexity llama-bench llama-batched-bench)
JOBS="${JOBS:-2}"                 # the project's machines have 2 cores

fail() { echo "build_llama_cpp.sh: $*" >&2; exit 2; }

DEST="${1:-$HOME/.cache/baichuan2/llama.cpp}"
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PIP="${PIP:-$HERE/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="$(command -v pip3 || true)"
for tool in cmake make c++ tar; do
    command -v "$tool" >/dev/null || fail "'$tool' is not installed; install it (Debian: apt-get install cmake build-essential)"
done
[ -n "$PIP" ] || fail "no pip found; run 'make test' once to create .venv, or set PIP=/path/to/pip"

ROOT="$DEST/llama-cpp-python-$PIN"
BIN="$ROOT/bin"
INFO="$ROOT/BUILD_INFO"

have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; [ -f "$INFO" ]; }

if have_all; then
    echo "llama.cpp already built for llama-cpp-python $PIN: $BIN"
    cat "$INFO"
    exit 0
fi

mkdir -p "$ROOT"
SDIST="$ROOT/llama_cpp_python-$PIN.tar.gz"
if [ ! -f "$SDIST" ]; then
    echo "downloading the llama-cpp-python $PIN sdist from PyPI (about 75 MB)"
    TMP="$(mktemp -d "$ROOT/download.XXXXXX")"
    "$PIP" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$PIN" -d "$TMP" \
        || fail "pip could not download llama-cpp-python==$PIN; check the network or PyPI access"
    mv "$TMP/llama_cpp_python-$PIN.tar.gz" "$SDIST"
    rm -rf "$TMP"
fi

SRC="$ROOT/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$SRC" "$ROOT/unpack"
    mkdir -p "$ROOT/unpack"
    tar xzf "$SDIST" -C "$ROOT/unpack" "llama_cpp_python-$PIN/vendor/llama.cpp"
    mv "$ROOT/unpack/llama_cpp_python-$PIN/vendor/llama.cpp" "$SRC"
    rm -rf "$ROOT/unpack"
fi

# The sdist has no git history: the build reports llama.cpp's own build number as 0 and its commit as unknown,
# so the ggml version and the sdist pin are what identify the sources.
GGML_VERSION="$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)).*/\2/p' "$SRC/ggml/CMakeLists.txt" | paste -sd.)"

cmake -S "$SRC" -B "$ROOT/build" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    > "$ROOT/cmake.log" 2>&1 || fail "cmake configure failed; see $ROOT/cmake.log"

echo "building ${TOOLS[*]} with make -j$JOBS (about 40 minutes on 2 shared cores); log: $ROOT/build.log"
( cd "$ROOT/build" && make -j"$JOBS" "${TOOLS[@]}" ) > "$ROOT/build.log" 2>&1 \
    || fail "the build failed; see the end of $ROOT/build.log"

mkdir -p "$BIN"
for t in "${TOOLS[@]}"; do cp "$ROOT/build/bin/$t" "$BIN/$t.tmp" && mv "$BIN/$t.tmp" "$BIN/$t"; done
VERSION_LINE="$("$BIN/llama-server" --version 2>&1 | grep -m1 -i 'version' || true)"
{
    echo "llama-cpp-python sdist: $PIN (PyPI), vendor/llama.cpp"
    echo "ggml version: $GGML_VERSION"
    echo "llama-server --version: ${VERSION_LINE:-unknown}"
    echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$INFO.tmp"
sync "$INFO.tmp" 2>/dev/null || true
mv "$INFO.tmp" "$INFO"
echo "built llama.cpp for llama-cpp-python $PIN: $BIN"
cat "$INFO"
