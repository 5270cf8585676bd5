"""HF transformers decode-speed reference for `afm-vl bench text`.

Usage: hf_generate.py MODEL_DIR PROMPT_IDS_JSON NEW_TOKENS THREADS
Loads the model (an HF-format directory: config.json + model.safetensors) in fp32, times its
own `generate` (greedy, exactly NEW_TOKENS tokens) after a warm-up, and prints one JSON line.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, ids_json, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
ids = torch.tensor([json.load(open(ids_json))], dtype=torch.long)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
mask = torch.ones_like(ids)
kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t0 = time.perf_counter()
    model(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    total = time.perf_counter() - t0
n = out.shape[1] - ids.shape[1]
# Decode speed: tokens after the first over the time after the prefill.
print(json.dumps({"prefill_s": prefill, "total_s": total, "new_tokens": n,
                  "decode_tok_s": (n - 1) / max(total - prefill, 1e-9),
                  "prefill_tok_s": ids.shape[1] / prefill}))
