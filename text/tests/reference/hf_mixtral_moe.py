"""HF transformers reference for the MoE parity test (acceptance 2 of the PT-MoE issue).

Usage: hf_mixtral_moe.py OUT.safetensors
Builds `MixtralSparseMoeBlock` (small `MixtralConfig`, seeded random weights), runs it on a
seeded input and writes, under our weight names (`moe.gate.weight`,
`moe.experts.{e}.{gate,up,down}_proj.weight`; transformers 5 stores the experts as fused 3-D
parameters `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I], split here),
the input `x`, the output `y`, the router logits `router_logits` and the load-balancing loss
`aux` of HF's `load_balancing_loss_func` for this one layer. Geometry in `meta` (int64:
hidden, ffn, experts, top_k).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig
from transformers.models.mixtral import modeling_mixtral as m

torch.manual_seed(0)
H, I, E, K = 32, 48, 6, 2
cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
block = m.MixtralSparseMoeBlock(cfg).float().eval()
with torch.no_grad():
    for p in block.parameters():
        p.copy_(torch.randn_like(p) * 0.2)
x = torch.randn(3, 7, H)
with torch.no_grad():
    y = block(x)
    logits = torch.nn.functional.linear(x.reshape(-1, H), block.gate.weight)
    aux = m.load_balancing_loss_func((logits,), E, K)

sd = block.state_dict()
out = {"moe.gate.weight": sd["gate.weight"].contiguous()}
if "experts.gate_up_proj" in sd:
    gu, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]
    for e in range(E):
        gate, up = gu[e].chunk(2, dim=0)
        out[f"moe.experts.{e}.gate_proj.weight"] = gate.contiguous()
        out[f"moe.experts.{e}.up_proj.weight"] = up.contiguous()
        out[f"moe.experts.{e}.down_proj.weight"] = down[e].contiguous()
else:  # transformers 4: one nn.Module per expert (w1 = gate, w3 = up, w2 = down)
    for e in range(E):
        out[f"moe.experts.{e}.gate_proj.weight"] = sd[f"experts.{e}.w1.weight"].contiguous()
        out[f"moe.experts.{e}.up_proj.weight"] = sd[f"experts.{e}.w3.weight"].contiguous()
        out[f"moe.experts.{e}.down_proj.weight"] = sd[f"experts.{e}.w2.weight"].contiguous()
out["x"] = x.contiguous()
out["y"] = y.contiguous()
out["router_logits"] = logits.contiguous()
out["aux"] = torch.as_tensor(aux, dtype=torch.float32).reshape(1)
out["meta"] = torch.tensor([H, I, E, K], dtype=torch.int64)
save_file(out, sys.argv[1])
