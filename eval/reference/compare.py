#!/usr/bin/env python3
"""Compare an `afm-vl eval` results.json with hf_reference.py output, item for item.

Prints a Markdown table per subset (subject / language): items, accuracy on each side,
prediction mismatches, largest log-likelihood difference (multiple choice) or generations
that differ in text (generation). Exit status 1 when any prediction differs.

Usage: compare.py RESULTS.json HF.json
"""
import json
import sys
from collections import defaultdict


def main():
    rust = json.load(open(sys.argv[1]))
    hf = json.load(open(sys.argv[2]))
    ritems = {i["key"]: i for i in rust["items"]}
    rows = defaultdict(lambda: {"n": 0, "r": 0, "h": 0, "mis": 0, "dll": 0.0, "text": 0})
    missing = []
    for key, h in hf["items"].items():
        r = ritems.get(key)
        if r is None:
            missing.append(key)
            continue
        row = rows[f"{r['task']}/{r['subset']}"]
        row["n"] += 1
        row["r"] += r["prediction"] == r["target"] if r["task"] != "mgsm" else r["correct"]
        h_ok = h["prediction"] == h["target"]
        if r["task"] in ("mgsm", "jsonl") and "generation" in h:
            try:
                h_ok = float(h["prediction"]) == float(h["target"])
            except ValueError:
                h_ok = False
        row["h"] += h_ok
        if r["prediction"] != h["prediction"]:
            row["mis"] += 1
            print(f"mismatch {key}: rust {r['prediction']!r} hf {h['prediction']!r}", file=sys.stderr)
        if "logliks" in h:
            row["dll"] = max([row["dll"]] + [abs(a - b) for a, b in zip(r["logliks"], h["logliks"])])
        if "generation" in h and r.get("generation") != h["generation"]:
            row["text"] += 1
    print(f"rust: {rust['model']}  |  reference: {hf['model']} ({hf['mode']} mode)\n")
    print("| subset | items | afm-vl acc % | HF acc % | prediction mismatches | max abs Δ log-lik | generations with different text |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    tot = defaultdict(float)
    for name, r in sorted(rows.items()):
        print(f"| {name} | {r['n']} | {100 * r['r'] / r['n']:.2f} | {100 * r['h'] / r['n']:.2f} | {r['mis']} | {r['dll']:.2e} | {r['text']} |")
        for k in ("n", "r", "h", "mis", "text"):
            tot[k] += r[k]
        tot["dll"] = max(tot["dll"], r["dll"])
    n = max(tot["n"], 1)
    print(f"| **all** | {int(tot['n'])} | {100 * tot['r'] / n:.2f} | {100 * tot['h'] / n:.2f} | {int(tot['mis'])} | {tot['dll']:.2e} | {int(tot['text'])} |")
    if missing:
        print(f"\n{len(missing)} reference items missing from results.json, e.g. {missing[:3]}")
    sys.exit(1 if tot["mis"] or missing else 0)


if __name__ == "__main__":
    main()
