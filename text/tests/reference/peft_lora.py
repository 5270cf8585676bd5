"""PEFT reference for the LoRA parity test: a tiny random LlamaForCausalLM (the tiny-dense
geometry), a PEFT LoRA adapter with non-zero random A and B on every attention and FFN linear,
both saved in their standard formats, and the adapted model's logits for fixed ids.
Usage: peft_lora.py OUT_DIR"""
import sys
import pathlib

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

out = pathlib.Path(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
base = LlamaForCausalLM(cfg).eval()
base.save_pretrained(out / "base", safe_serialization=True)
lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(base, lcfg).eval()
model.save_pretrained(out / "adapter")
ids = torch.tensor([[1, 17, 45, 200, 3, 99, 7, 7, 150, 31]])
with torch.no_grad():
    logits = model(ids).logits[0].float().contiguous()
save_file({"ids": ids[0].contiguous(), "logits": logits}, str(out / "ref.safetensors"))
