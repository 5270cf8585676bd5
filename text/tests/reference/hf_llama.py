"""HF transformers reference for the text-decoder parity test.

Reads a JSON request {"gguf": path, "prompts": [[ids...], ...], "gen_tokens": N, "out": path},
loads LlamaForCausalLM from the GGUF (transformers dequantises it itself), and writes a
safetensors file with, per prompt i, `logits_i` ([seq, vocab], fp32, every position) and
`gen_i` (greedy continuation ids, stopping at EOS like ours).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

req = json.load(open(sys.argv[1]))
torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
gguf = req["gguf"]
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
)
model.eval()
out = {}
with torch.no_grad():
    for i, ids in enumerate(req["prompts"]):
        x = torch.tensor([ids], dtype=torch.long)
        out[f"logits_{i}"] = model(x).logits[0].float().contiguous()
        if req.get("gen_tokens", 0) > 0:
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=req["gen_tokens"],
                do_sample=False,
                eos_token_id=req.get("eos"),
                pad_token_id=req.get("eos"),
            )
            new = g[0, x.shape[1]:]
            if req.get("eos") is not None and len(new) and new[-1].item() == req["eos"]:
                new = new[:-1]
            out[f"gen_{i}"] = new.to(torch.int64).contiguous()
save_file(out, req["out"])
