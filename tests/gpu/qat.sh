#!/usr/bin/env bash
# 2-bit QAT of SmolLM2-135M-Instruct on a CUDA machine (issue 9), two learning rates side by
# side on one GPU, then the perplexity of the results (`quant_ppl`, MGSM questions 1–30).
#
#   tests/gpu/qat.sh DIR
#
# DIR holds `afm-vl` and the `quant_ppl` example (built against that machine's libtorch; see
# tests/gpu/check.sh), `qat_corpus.txt`, `mgsm_en.tsv`, and the SmolLM2 GGUF as
# `gguf.part*` pieces with `gguf.sha256` (the pieces may arrive over several calls: each run
# collects the ones present into $WORK and goes on once all are there). Environment: WORK
# (default /tmp/qat), OUT (results, default /tmp/qat-out), MINUTES of training per run
# (default 3.5), LRS (default "2e-5 1e-4"), QAT_DEVICE (default cuda), LIBTORCH_LIB as in
# check.sh. The best model's
# model.safetensors comes back in 15 MiB pieces (best.part*), with everything else in
# results.tar.
set -eu
D=$(cd "${1:?usage: tests/gpu/qat.sh DIR}" && pwd)
WORK=${WORK:-/tmp/qat}
OUT=${OUT:-/tmp/qat-out}
MINUTES=${MINUTES:-3.5}
LRS=${LRS:-2e-5 1e-4}
mkdir -p "$WORK" "$OUT"
# shellcheck source=tests/gpu/gguf.sh
. "$(dirname "$0")/gguf.sh"
collect_gguf "$D" "$WORK" || exit 0
use_libtorch
cat "$WORK"/gguf.part* > "$WORK/model.gguf"
"$D/afm-vl" -q --device cpu convert gguf "$WORK/model.gguf" "$WORK/fp32"
for lr in $LRS; do
    "$D/afm-vl" --device "${QAT_DEVICE:-cuda}" train qat --model "$WORK/fp32" --data "$D/qat_corpus.txt" \
        --out "$WORK/qat-$lr" --bits 2 --embed-bits 8 --lr "$lr" --steps 100000 \
        --batch-size 16 --seq-len 256 --max-minutes "$MINUTES" > "$OUT/qat-$lr.log" 2>&1 &
done
wait
for lr in $LRS; do tail -c 400 "$OUT/qat-$lr.log"; echo; cp "$WORK/qat-$lr/qat_log.json" "$OUT/qat_log-$lr.json" || true; done
QUANT_PPL_CORPUS="$D/mgsm_en.tsv" QUANT_PPL_QUESTIONS=30 "$D/quant_ppl" "$WORK/fp32" "$WORK"/qat-* \
    2>&1 | tee "$OUT/ppl.txt"
best=$(python3 - "$OUT/ppl.txt" <<'PY'
import re, sys
rows = [(float(m.group(2)), m.group(1)) for m in re.finditer(r'(qat-[0-9e.+-]+)\S*\s.*?perplexity\s+([0-9.]+)', open(sys.argv[1]).read())]
print(min(rows)[1] if rows else "")
PY
)
echo "best: $best"
if [ -n "$best" ]; then
    cp "$WORK/$best/config.json" "$OUT/best-config.json"
    echo "$best" > "$OUT/best-name.txt"
    split -b 15M -d "$WORK/$best/model.safetensors" "$OUT/best.part"
fi
(cd "$OUT" && tar cf results.tar --exclude='best.part*' --exclude=results.tar ./*)
find "$OUT" -maxdepth 1 -type f ! -name 'best.part*' ! -name results.tar -delete
ls -la "$OUT"
