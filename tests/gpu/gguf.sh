# Sourced by the GPU scripts: the SmolLM2 GGUF arrives as `gguf.part*` pieces with
# `gguf.sha256` in DIR, possibly over several calls (a call carries at most 64 MiB).
#
#   collect_gguf DIR WORK   copy the pieces present into WORK; succeed once all are there
#                           (their concatenation matches the checksum), else say what is
#                           there and fail.
#   use_libtorch            put the machine's libtorch (LIBTORCH_LIB, default: the one of
#                           python3's torch) on LD_LIBRARY_PATH and list the GPUs.
collect_gguf() {
    cp "$1"/gguf.part* "$2"/ 2>/dev/null || true
    local want
    want=$(cut -d' ' -f1 "$1/gguf.sha256")
    if [ "$(cat "$2"/gguf.part* | sha256sum | cut -d' ' -f1)" != "$want" ]; then
        echo "GGUF incomplete: have $(ls "$2" | tr '\n' ' ')"
        return 1
    fi
}

use_libtorch() {
    local lib=${LIBTORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib}
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    nvidia-smi -L || true
}
