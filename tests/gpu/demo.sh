#!/usr/bin/env bash
# Demo-checkpoint recipes (issue 6) trained side by side on one CUDA machine, each then scored
# with `eval-demo` (200 held-out scenes per mode). A quick way to compare recipes before the
# one that is kept is trained on the 2-core machine.
#
#   tests/gpu/demo.sh DIR
#
# DIR holds `afm-vl` (or `afm-vl.xz`, built against that machine's libtorch; see check.sh) and
# the SmolLM2 GGUF as `gguf.part*` pieces with `gguf.sha256` (the pieces may arrive over
# several calls: each run collects the ones present into $WORK and goes on once all are
# there). Environment: WORK (default /tmp/demo), OUT (results, default /tmp/demo-out), TRAIN_S
# (seconds of training per recipe, default 330; the last checkpoint saved is scored), SCENES
# (default 200), RECIPES (`name:flags;name:flags…`, the flags of `afm-vl train demo`),
# LIBTORCH_LIB as in check.sh.
set -eu
D=$(cd "${1:?usage: tests/gpu/demo.sh DIR}" && pwd)
WORK=${WORK:-/tmp/demo}
OUT=${OUT:-/tmp/demo-out}
TRAIN_S=${TRAIN_S:-330}
SCENES=${SCENES:-200}
RECIPES=${RECIPES:-"count:--stage2-steps 2000;nocount:--stage2-steps 2000 --no-count-token"}
mkdir -p "$WORK" "$OUT"
if [ -f "$D/afm-vl.xz" ]; then xz -dc "$D/afm-vl.xz" > "$WORK/afm-vl"; chmod +x "$WORK/afm-vl"; fi
if [ -f "$D/afm-vl" ]; then cp "$D/afm-vl" "$WORK/afm-vl"; fi
# shellcheck source=tests/gpu/gguf.sh
. "$(dirname "$0")/gguf.sh"
collect_gguf "$D" "$WORK" || exit 0
use_libtorch
BIN=$WORK/afm-vl
if [ ! -f "$WORK/smol/config.json" ]; then
    cat "$WORK"/gguf.part* > "$WORK/model.gguf"
    "$BIN" -q --device cpu convert gguf "$WORK/model.gguf" "$WORK/smol"
fi
IFS=';' read -ra list <<< "$RECIPES"
for r in "${list[@]}"; do
    name=${r%%:*}; flags=${r#*:}
    # shellcheck disable=SC2086
    timeout "$TRAIN_S" "$BIN" -q --device cuda --threads 4 train demo --text-model "$WORK/smol" \
        --out "$WORK/$name" --save-every 100 --eval-every 250 $flags > "$OUT/$name.train.log" 2>&1 &
done
wait || true
for r in "${list[@]}"; do
    name=${r%%:*}
    cp "$WORK/$name/train_log.jsonl" "$OUT/$name.train_log.jsonl" 2>/dev/null || true
    "$BIN" -q --device cuda --threads 4 eval-demo --model "$WORK/$name" -n "$SCENES" \
        --json "$OUT/$name.eval.json" > "$OUT/$name.eval.txt" 2>&1 &
done
wait || true
for r in "${list[@]}"; do
    name=${r%%:*}
    echo "== $name: $(grep -c '"stage":2' "$OUT/$name.train_log.jsonl" 2>/dev/null) stage-2 steps"
    grep -v '"eval_f1":null' "$OUT/$name.train_log.jsonl" 2>/dev/null | grep '"stage":2' | tail -4 | cut -c1-200 || true
    cat "$OUT/$name.eval.txt"
done
