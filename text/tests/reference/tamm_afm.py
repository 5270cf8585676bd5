"""Reference for text/tests/tamm_parity.rs: Apple's tamm (PyPI tamm 0.2.0) as the oracle.

Builds a random AFMTextV7 (KV reuse, 2 KV heads, QK-norm) with every norm weight random (the
QK-norm weights differ within each rotary pair, so a wrong RoPE layout or norm order shows)
and weights scaled so the logits are of order 3-10, saves it in the adapter toolkit's layout
(`base-model-config.json` through tamm's JSON utilities, `base-model.pt` through torch.save of
the state dict) and writes tamm's fp32 logits for a few prompts and 32-token greedy
continuations (full forward every step) into `reference.safetensors`.

usage: tamm_afm.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tamm.models.afm_text import AFMTextV7
from tamm.utils import json as tamm_json

PROMPTS = [
    [5, 17, 99, 3, 250, 8, 64, 1, 77, 12, 300, 41],
    [9],
    list(range(1, 40, 3)),
]


def build(seed: int):
    torch.manual_seed(seed)
    cfg = AFMTextV7.Config(
        vocab_size=320,
        hidden_dim=64,
        num_layers=5,
        num_kv_reuse_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
    )
    model = cfg.create_model()
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
            else:
                p.normal_(0.0, 0.25)  # with the tied head: logits of order 3-10
    return cfg, model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def greedy(model, ids, n):
    out = list(ids)
    for _ in range(n):
        out.append(int(logits(model, out)[-1].argmax()))
    return out[len(ids):]


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cfg, model = build(0)
    (out / "base-model-config.json").write_text(tamm_json.dumps(cfg, indent=2))
    torch.save(model.state_dict(), out / "base-model.pt")
    ref = {}
    for i, ids in enumerate(PROMPTS):
        ref[f"ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
        ref[f"logits_{i}"] = logits(model, ids).contiguous()
        ref[f"gen_{i}"] = torch.tensor(greedy(model, ids, 32), dtype=torch.int64)
    save_file(ref, str(out / "reference.safetensors"))
    scale = max(float(ref[f"logits_{i}"].abs().max()) for i in range(len(PROMPTS)))
    print(json.dumps({"max_abs_logit": scale}))


if __name__ == "__main__":
    main()
