"""Reference for text/tests/tamm_parity.rs: Apple's tamm (PyPI tamm 0.2.0) as the oracle.

Builds a random AFMTextV7 (KV reuse, 2 KV heads, QK-norm) with every norm weight random (the
QK-norm weights differ within each rotary pair, so a wrong RoPE layout or norm order shows)
and weights scaled so the logits are of order 3-10, saves it in the adapter toolkit's layout
(`base-model-config.json` through tamm's JSON utilities, `base-model.pt` through torch.save of
the state dict) and writes tamm's fp32 logits for a few prompts and 32-token greedy
continuations (full forward every step) into `reference.safetensors`.

With a tokenizer (a SentencePiece model trained here, in the toolkit's layout), it also records
the text tamm's AFMTokenizer decodes from a 32-token greedy continuation of a raw prompt
(stopping at EOS or <turn_end>, as afm-vl does), for the CLI test.

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


def build(seed: int, vocab_size: int, kv_quant: bool = False, adapters=None, skip_first: bool = False):
    torch.manual_seed(seed)
    extra = {}
    if adapters is not None:
        extra["adapters"] = adapters
    if kv_quant:
        from tamm.ao.arch_optimizers.kv_quant import KVQuantArchOptimizer

        extra["arch_optimizers"] = {
            "kv_quant": KVQuantArchOptimizer(freeze_qparams=True, skip_quantize_for_first_token=skip_first)
        }
    cfg = AFMTextV7.Config(
        **extra,
        vocab_size=vocab_size,
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
            elif "_transpose" in name:
                p.normal_(0.0, 0.08)  # LoRA: an update of the order of a trained adapter's
            else:
                p.normal_(0.0, 0.25)  # with the tied head: logits of order 3-10
        # Calibrated KV-quantiser ranges (as training would leave them), a coarse grid.
        for name, b in model.named_buffers():
            if name.endswith("activation_post_process.range"):
                b.copy_(torch.tensor([-(0.5 + torch.rand(1).item()), 0.5 + torch.rand(1).item()]))
    return cfg, model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def cached_greedy(model, ids, n, kv_heads=2, head_dim=16, cache_layers=3):
    """Greedy decoding through tamm's KV cache, the prompt's prefill flagged as the first-token
    pass (what a generator does): every position's logits of the prefill, then one row per
    decode step, and the tokens."""
    from tamm import first_token_generation_context
    from tamm.layers.transformer.kv_cache import VanillaKVCache

    cache = VanillaKVCache(num_layers=cache_layers, batch_size=1, length=len(ids) + n,
                           hidden_dim=kv_heads * head_dim, dtype=torch.float32)
    with torch.no_grad():
        with first_token_generation_context():
            rows = [model(torch.tensor([ids]), kv_cache=cache.up_to_index(len(ids))).logits[0]]
        gen = [int(rows[0][-1].argmax())]
        for i in range(n - 1):
            row = model(torch.tensor([[gen[-1]]]), kv_cache=cache.up_to_index(len(ids) + i + 1)).logits[0]
            rows.append(row)
            gen.append(int(row[-1].argmax()))
    return torch.cat(rows).float(), gen


def greedy(model, ids, n):
    out = list(ids)
    for _ in range(n):
        out.append(int(logits(model, out)[-1].argmax()))
    return out[len(ids):]


def train_tokenizer(out):
    """A SentencePiece model trained here, in the toolkit's layout (tokenizer.model +
    tokenizer-config.json under `out`); returns tamm's AFMTokenizer for it."""
    import sentencepiece as spm
    from tamm.tokenizers.afm import AFMTokenizer
    from tamm.utils import json as tamm_json2

    corpus = out / "corpus.txt"
    corpus.write_text(
        "The quick brown fox jumps over the lazy dog.\nApple models run on device.\n" * 50
        + "Once upon a time there was a small model that learned to speak.\n" * 50
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=400,
        model_type="unigram", byte_fallback=True, user_defined_symbols=["<n>"],
        hard_vocab_limit=False, minloglevel=2,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    tcfg = AFMTokenizer.Config(vocab_path="tokenizer.model", user_defined_tokens=["<turn_start>", "<turn_end>"])
    (out / "tokenizer-config.json").write_text(tamm_json2.dumps(tcfg, indent=2))
    return AFMTokenizer(vocab_path=str(out / "tokenizer.model"), user_defined_tokens=["<turn_start>", "<turn_end>"])


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer and a raw-prompt continuation through it (for `afm-vl generate --raw`).
    tok = train_tokenizer(out)
    # The model's vocabulary is the tokenizer's, so every id it can emit decodes.
    cfg, model = build(0, len(tok))
    (out / "base-model-config.json").write_text(tamm_json.dumps(cfg, indent=2))
    torch.save(model.state_dict(), out / "base-model.pt")
    ref = {}
    for i, ids in enumerate(PROMPTS):
        ref[f"ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
        ref[f"logits_{i}"] = logits(model, ids).contiguous()
        ref[f"gen_{i}"] = torch.tensor(greedy(model, ids, 32), dtype=torch.int64)
    stops = {tok.eos_id, tok.tokenizer.piece_to_id("<turn_end>")}
    prompt = "Once upon a time"
    seq = tok.encode(prompt)
    gen = []
    for _ in range(32):
        nxt = int(logits(model, seq + gen)[-1].argmax())
        if nxt in stops:
            break
        gen.append(nxt)
    (out / "cli_reference.json").write_text(json.dumps({"prompt": prompt, "text": tok.decode(gen), "ids": gen}))
    save_file(ref, str(out / "reference.safetensors"))
    # A draft for speculative decoding (the toolkit's draft-model-*): a smaller AFMTextV7
    # without KV reuse, same tokenizer.
    # Its weights are the base's embedding, output norm and first two layers, so it agrees
    # with the base often enough for acceptances and rejections both to happen.
    dcfg = AFMTextV7.Config(
        vocab_size=len(tok), hidden_dim=64, num_layers=2, num_kv_reuse_layers=0,
        num_heads=4, num_kv_heads=2, rope_theta=10000.0,
    )
    draft = dcfg.create_model()
    draft.eval()
    base_sd = model.state_dict()
    with torch.no_grad():
        for name, p in draft.state_dict().items():
            src = name.replace("layers.layer_", "layers.segment_0.layer_")
            p.copy_(base_sd[src])
    (out / "draft-model-config.json").write_text(tamm_json.dumps(dcfg, indent=2))
    torch.save(draft.state_dict(), out / "draft-model.pt")
    ref["draft_logits_0"] = logits(draft, PROMPTS[0]).contiguous()
    # tamm in bf16 (the model cast as a whole: weights and norm gains in bf16, norms computed
    # in fp32), for the bf16 comparison.
    model16 = build(0, len(tok))[1].to(torch.bfloat16)
    for i, ids in enumerate(PROMPTS):
        ref[f"bf16_{i}"] = logits(model16, ids).contiguous()
    save_file(ref, str(out / "reference.safetensors"))

    # The same model with tamm's KV quantiser on (the toolkit's config turns it on).
    kcfg, kmodel = build(0, len(tok), kv_quant=True)
    kdir = out / "kvq"
    kdir.mkdir(exist_ok=True)
    (kdir / "base-model-config.json").write_text(tamm_json.dumps(kcfg, indent=2))
    torch.save(kmodel.state_dict(), kdir / "base-model.pt")
    kref = {}
    for i, ids in enumerate(PROMPTS):
        kref[f"logits_{i}"] = logits(kmodel, ids).contiguous()
        # The quantiser must matter: the same weights without it give other logits.
        kref[f"plain_{i}"] = logits(model, ids).contiguous()
    save_file(kref, str(kdir / "reference.safetensors"))

    # skip_quantize_for_first_token: generation's first-token pass (the prefill) attends to
    # the prompt unquantised, caching it quantised; a plain forward quantises everything.
    scfg, smodel = build(0, len(tok), kv_quant=True, skip_first=True)
    sdir = out / "kvq_skip"
    sdir.mkdir(exist_ok=True)
    (sdir / "base-model-config.json").write_text(tamm_json.dumps(scfg, indent=2))
    torch.save(smodel.state_dict(), sdir / "base-model.pt")
    sref = {}
    for i, ids in enumerate(PROMPTS):
        sref[f"plain_{i}"] = logits(smodel, ids).contiguous()
        rows, gen = cached_greedy(smodel, ids, 32)
        sref[f"cached_{i}"] = rows.contiguous()
        sref[f"gen_{i}"] = torch.tensor(gen, dtype=torch.int64)
    save_file(sref, str(sdir / "reference.safetensors"))
    scale = max(float(ref[f"logits_{i}"].abs().max()) for i in range(len(PROMPTS)))
    print(json.dumps({"max_abs_logit": scale}))


if __name__ == "__main__":
    main()
