#!/usr/bin/env bash
# Downloads into wheels/ (git-ignored) the Python packages benchmarks/gpu_check.sh needs that the device
# image lacks, as wheels for its Python 3.12 on x86-64; gpu_check.sh installs them there with no index.
# The image already has torch, transformers, accelerate, peft, safetensors, typer, rich, pyarrow, pandas,
# xxhash, fsspec and huggingface-hub; it lacks datasets (and its dill and multiprocess) and trl. The
# versions are this machine's (the ones the tests ran with) unless PACKAGES names others.
#   benchmarks/gpu_wheels.sh              # then copy the tree with wheels/ to the CUDA machine and run
#                                         # bash benchmarks/gpu_check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NAMES="datasets trl dill multiprocess"
PACKAGES=${PACKAGES:-$("$PY" -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $NAMES)}
rm -rf wheels && mkdir -p wheels
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # PACKAGES is a list of requirement specifiers
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d wheels $PACKAGES
size=$(du -sk wheels | cut -f1)
ls -1 wheels
echo "wheels/: $(( size / 1024 )) MiB ($size KiB) for: $PACKAGES"
if [ "$size" -gt $(( 64 * 1024 )) ]; then
    echo "gpu_wheels: wheels/ is over the 64 MiB that travels to the device machine" >&2
    exit 1
fi
