#!/usr/bin/env bash
# Acceptance checks 1-3 of the eval issue against HF transformers (CPU, fp32):
#   1. MMLU 5-shot, full test split of 10 subjects: predictions equal item for item;
#   2. MGSM-en 8-shot CoT, 50 items: extracted answers equal (greedy);
#   3. items/s: afm-vl with / without prefix reuse vs HF (naive and prefix-cached), same run.
# Usage: eval/reference/acceptance.sh [OUT_DIR] (from the repository root, after `make build`).
set -euo pipefail
OUT=${1:-eval-acceptance}
BIN=${AFM_VL:-target/release/afm-vl}
PY=${PY:-.venv/bin/python}
BENCH=${BENCH:-../shared/bench}
SUBJECTS=global_facts,abstract_algebra,management,medical_genetics,world_religions,electrical_engineering,college_chemistry,college_mathematics,computer_security,us_foreign_policy
mkdir -p "$OUT"
step() { echo "== $*" >&2; }

if [[ "${SKIP_MMLU:-0}" != 1 ]]; then
step "1. MMLU parity, 10 subjects, full test split"
"$BIN" -q eval "$BENCH/mmlu" --subjects "$SUBJECTS" --dump-requests "$OUT/mmlu_requests.json"
rm -rf "$OUT/mmlu"
"$BIN" -q eval "$BENCH/mmlu" --subjects "$SUBJECTS" --out "$OUT/mmlu"
"$PY" eval/reference/hf_reference.py "$OUT/mmlu_requests.json" --mode prefix --out "$OUT/mmlu_hf.json"
"$PY" eval/reference/compare.py "$OUT/mmlu/results.json" "$OUT/mmlu_hf.json" | tee "$OUT/mmlu_parity.md"
fi

if [[ "${SKIP_MGSM:-0}" != 1 ]]; then
step "2. MGSM-en parity, 50 items"
"$BIN" -q eval "$BENCH/mgsm" --languages en --limit 50 --dump-requests "$OUT/mgsm_requests.json"
rm -rf "$OUT/mgsm"
"$BIN" -q eval "$BENCH/mgsm" --languages en --limit 50 --out "$OUT/mgsm"
"$PY" eval/reference/hf_reference.py "$OUT/mgsm_requests.json" --mode prefix --out "$OUT/mgsm_hf.json"
"$PY" eval/reference/compare.py "$OUT/mgsm/results.json" "$OUT/mgsm_hf.json" | tee "$OUT/mgsm_parity.md"
fi

if [[ "${SKIP_SPEED:-0}" != 1 ]]; then
# Prefix reuse pays once a subject has many questions (a full subject has 100+); the speed
# sample keeps that shape: SPEED_LIMIT questions of each of SPEED_SUBJECTS.
SPEED_SUBJECTS=${SPEED_SUBJECTS:-$SUBJECTS}
step "3. speed, MMLU ${SPEED_SUBJECTS} x ${SPEED_LIMIT:=24} items, same run"
"$BIN" -q eval "$BENCH/mmlu" --subjects "$SPEED_SUBJECTS" --limit "$SPEED_LIMIT" --dump-requests "$OUT/speed_requests.json"
rm -rf "$OUT/speed_reuse" "$OUT/speed_noreuse"
"$BIN" -q eval "$BENCH/mmlu" --subjects "$SPEED_SUBJECTS" --limit "$SPEED_LIMIT" --out "$OUT/speed_reuse"
"$BIN" -q eval "$BENCH/mmlu" --subjects "$SPEED_SUBJECTS" --limit "$SPEED_LIMIT" --out "$OUT/speed_noreuse" --no-prefix-reuse
"$PY" eval/reference/hf_reference.py "$OUT/speed_requests.json" --mode naive --out "$OUT/speed_hf_naive.json"
"$PY" eval/reference/hf_reference.py "$OUT/speed_requests.json" --mode prefix --out "$OUT/speed_hf_prefix.json"
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/speed.md"
import json, sys
out = sys.argv[1]
r = lambda p: json.load(open(f"{out}/{p}"))
rows = [
    ("afm-vl, prefix KV reuse (batch 8)", r("speed_reuse/results.json")["timings"]["items_per_s"]),
    ("afm-vl, no prefix reuse (batch 8)", r("speed_noreuse/results.json")["timings"]["items_per_s"]),
    ("HF transformers, one forward per item", r("speed_hf_naive.json")["timings"]["items_per_s"]),
    ("HF transformers, prefix KV copied per item", r("speed_hf_prefix.json")["timings"]["items_per_s"]),
]
base = rows[2][1]
print("| run | items/s | vs HF per-item forward |\n| --- | ---: | ---: |")
for name, v in rows:
    print(f"| {name} | {v:.3f} | {v / base:.2f}x |")
PYEOF
fi
