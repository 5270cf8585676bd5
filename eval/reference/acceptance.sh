#!/usr/bin/env bash
# Acceptance checks 1-3 of the eval issue against HF transformers (CPU, fp32):
#   1. MMLU 5-shot, full test split of 10 subjects: predictions equal item for item;
#   2. MGSM-en 8-shot CoT, 50 items: extracted answers equal (greedy);
#   3. items/s: afm-vl with / without prefix reuse vs HF (naive and prefix-cached), same run.
# Usage: eval/reference/acceptance.sh [OUT_DIR] (from the repository root, after `make build`).
# On a shared machine, OMP_NUM_THREADS=1 and the "items per CPU s" column make the speed
# comparison fair; SKIP_MMLU=1 / SKIP_MGSM=1 / SKIP_SPEED=1 skip parts.
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
"$PY" eval/reference/hf_reference.py "$OUT/speed_requests.json" ${OMP_NUM_THREADS:+--threads $OMP_NUM_THREADS} --mode naive --out "$OUT/speed_hf_naive.json"
"$PY" eval/reference/hf_reference.py "$OUT/speed_requests.json" ${OMP_NUM_THREADS:+--threads $OMP_NUM_THREADS} --mode prefix --out "$OUT/speed_hf_prefix.json"
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/speed.md"
import json, sys
out = sys.argv[1]
r = lambda p: json.load(open(f"{out}/{p}"))
t = lambda p: r(p)["timings"]
rows = [
    ("afm-vl, prefix KV reuse (batch 8)", t("speed_reuse/results.json")),
    ("afm-vl, no prefix reuse (batch 8)", t("speed_noreuse/results.json")),
    ("HF transformers, one forward per item", t("speed_hf_naive.json")),
    ("HF transformers, prefix KV copied per item", t("speed_hf_prefix.json")),
]
base, base_cpu = rows[2][1]["items_per_s"], rows[2][1].get("items_per_cpu_s") or 1
print("| run | items/s | vs HF per-item forward | items per CPU s | vs HF per-item forward |")
print("| --- | ---: | ---: | ---: | ---: |")
for name, v in rows:
    c = v.get("items_per_cpu_s", 0.0)
    print(f"| {name} | {v['items_per_s']:.3f} | {v['items_per_s'] / base:.2f}x | {c:.3f} | {c / base_cpu:.2f}x |")
PYEOF
fi
