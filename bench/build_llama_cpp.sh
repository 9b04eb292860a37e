#!/usr/bin/env bash
# Build llama.cpp with native CPU flags from the llama-cpp-python sdist (the one copy of its source on PyPI), for
# the runtime benchmark's reference rows: `python bench/split_cores.py --llama-cpp <DIR>/bin`. Not a dependency
# of the project; only llama-bench and llama-speculative-simple are built (~15-25 min on 2 cores).
#
#   bash bench/build_llama_cpp.sh [DIR]     # default DIR: ~/.cache/s2t/llama.cpp
#
# Needs cmake, a C++ compiler and ninja or make (Debian: apt-get install cmake g++ ninja-build).
set -euo pipefail
VERSION=0.3.36  # llama-cpp-python; its vendor/llama.cpp is the source that is built
DIR=${1:-${HOME}/.cache/s2t/llama.cpp}
PY=${PYTHON:-python3}
mkdir -p "$DIR/sdist"
if [ ! -d "$DIR/llama_cpp_python-$VERSION" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist" -q
  tar -xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$DIR/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$DIR/bin"
cmake --build "$DIR/build" -j "$(nproc)" --target llama-bench llama-speculative-simple
echo "built: $DIR/bin/llama-bench $DIR/bin/llama-speculative-simple"
