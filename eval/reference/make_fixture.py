#!/usr/bin/env python3
"""Turn a parity run into the regression fixture of eval/tests/text_backend.rs: the first
N items per subject of REQUESTS.json (from `afm-vl eval --dump-requests`) with HF's
log-likelihoods and predictions from HF.json (hf_reference.py).

Usage: make_fixture.py REQUESTS.json HF.json OUT.json [--per-subset N]
"""
import argparse
import json
from collections import Counter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("requests")
    ap.add_argument("hf")
    ap.add_argument("out")
    ap.add_argument("--per-subset", type=int, default=2)
    a = ap.parse_args()
    req = json.load(open(a.requests))
    hf = json.load(open(a.hf))
    seen = Counter()
    items, groups = [], {}
    for it in req["items"]:
        h = hf["items"].get(it["key"])
        if h is None or "logliks" not in h or seen[it["group"]] >= a.per_subset:
            continue
        seen[it["group"]] += 1
        groups[it["group"]] = req["groups"][it["group"]]
        items.append({**it, "hf_logliks": h["logliks"], "hf_prediction": h["prediction"]})
    json.dump({"reference": hf["model"], "groups": groups, "items": items}, open(a.out, "w"))
    print(f"{len(items)} items from {len(groups)} groups -> {a.out}")


if __name__ == "__main__":
    main()
