#!/usr/bin/env bash
# The GPU check (issue 7: tracks on CUDA devices and streams), for a CUDA machine.
#
# Build on any Linux machine with the project's libtorch (a CUDA wheel, as `make setup` installs):
#   cargo build --release && cargo test --release -p afm-text --test cuda --no-run
# copy `target/release/afm-vl` and the `cuda` test binary (target/release/deps/cuda-*) into
# one folder as `afm-vl` and `cuda`, and run this script there with that folder:
#   tests/gpu/check.sh DIR
# It runs the GPU parity tests (text/tests/cuda.rs, ignored elsewhere) and benches the
# `bench-ptmoe` preset with all tracks on the GPU, tracks on the GPU under a CPU main model,
# and on the CPU. LIBTORCH_LIB overrides where libtorch's libraries are found (default: the
# `torch` of `python3`). Logs go to $OUT (default /tmp/gpu-check).
set -u
BIN=${1:?usage: tests/gpu/check.sh DIR}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi -L
LIB=${LIBTORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib}
export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -c 'import torch; print("libtorch from torch", torch.__version__)' 2>/dev/null
rc=0
"$BIN/cuda" --include-ignored --nocapture --test-threads 1 2>&1 | tee "$OUT/cuda_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
for devs in "--device cuda" "--device cpu --track-devices cuda,cuda" "--device cpu"; do
    echo "== bench text --preset bench-ptmoe $devs"
    # shellcheck disable=SC2086
    timeout 200 "$BIN/afm-vl" bench text --preset bench-ptmoe $devs --tokens 64 --prompt 128 \
        --repeats 5 2>&1 | tee -a "$OUT/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
exit $rc
