#!/usr/bin/env bash
# Build llama.cpp with native CPU flags from the llama-cpp-python sdist (the one copy of its source on PyPI), for
# the runtime benchmark's reference rows: `python bench/split_cores.py --llama-cpp <DIR>`. Not a dependency
# of the project; only llama-bench and llama-speculative-simple are built (7 min 21 s on a 2-core AVX-512 Xeon, beside a training run; 15-25 min on an earlier AVX2 machine).
#
#   bash bench/build_llama_cpp.sh [DIR]     # default DIR: ~/.cache/s2t/llama.cpp
#
# The benchmarks take DIR itself (`--llama-cpp ~/.cache/s2t/llama.cpp`): llama.cpp's CMakeLists puts its
# executables in <build>/bin whatever the command line says, and the scripts look there.
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
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
cmake --build "$DIR/build" -j "$(nproc)" --target llama-bench llama-speculative-simple llama-batched-bench
BIN=$(dirname "$(find "$DIR/build" -type f -name llama-bench -perm -u+x | head -n 1)")
echo "built: $BIN/llama-bench $BIN/llama-speculative-simple $BIN/llama-batched-bench (pass --llama-cpp $DIR to the benchmarks)"
