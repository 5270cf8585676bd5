"""Reference for text/tests/tamm_ptmoe.rs: Apple's tamm (PyPI tamm 0.2.0) AFMParallelTrackMoE as
the oracle for the server model.

Builds random tamm PT-MoE models in the test (>= 2 tracks, >= 2 segments, >= 4 experts, a
window shorter than the prompts, every norm weight random including the QK-norms, router
weights large enough that the soft cap at 50 changes the routing weights), saves each in
tamm's way (the config through tamm's JSON utilities as `config.json`, the state dict through
torch.save as `model.pt`) and writes tamm's fp32 logits of a full forward for a few prompts
and 12-token greedy continuations (full forward every step), and the logits of every position
of prompt + continuation, into `reference.safetensors`. `lora/` is a model saved with a tamm
LoRA adapter (per track, on attention and the dense FFNs) in its config and state dict.

`lora_moe/` adapts the experts too (`adapt_moe=True`). tamm 0.2.0 cannot run that model (its
batched LoRA meets the dispatched expert inputs with mismatched shapes), so its reference is
tamm's forward with each expert's LoRA merged into the expert weights (`W + α/r · A·B`, the
same function) and the other adapters running as LoRAs.

`lora/toolkit/` is the adapter toolkit's way of shipping the same adapter: the base checkpoint
with the adapter spec in its config and the adapter's B at zero (`model.pt`), the trained adapter
alone in `adapter.pt`; its `reference.safetensors` holds the base's logits (`base_{k}`).

`cli/` holds one more model with tamm's AFM tokenizer beside it (a SentencePiece model trained
here) and `cli_reference.json`, the text tamm decodes from a raw prompt's greedy continuation.

Also writes `keys.json`: the state-dict keys and shapes of tamm's default configuration built
on the meta device (the server model, 147.8B parameters).

usage: tamm_ptmoe.py OUT_DIR
       tamm_ptmoe.py score MODEL_DIR REQUESTS.json OUT.json
           scores the requests `afm-vl eval --dump-requests` wrote with the tamm model in
           MODEL_DIR (a folder this script wrote, with its tokenizer), one full forward per
           continuation or generated token: multiple choice log-likelihoods, greedy generations
           (stopping at EOS, <turn_end>, a stop string or max_new_tokens).
       tamm_ptmoe.py check MODEL_DIR ADAPTER_DIR OUT.safetensors
           tamm builds MODEL_DIR's model with the LoRA spec of ADAPTER_DIR/adapter-config.json
           (what `afm-vl train lora` writes), loads the base weights and ADAPTER_DIR/adapter.pt
           (strict=False: fails on an unexpected key or an adapter tensor left unloaded) and
           writes its logits for PROMPTS (`ids_{k}`, `logits_{k}`).
"""

import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tamm.models.afm_text.afm_pt_moe import AFMParallelTrackMoEConfig
from tamm._adapters_v1.model_adapters.lora import LoRAModelAdapter
from tamm.utils import json as tamm_json

PROMPTS = [
    [5, 17, 9, 3, 50, 8, 64, 1, 77, 12, 30, 41, 2, 88],
    [9],
    list(range(1, 40, 3)),
]

BASE = dict(
    vocab_size=97,
    num_tracks=2,
    num_layers_per_track=4,
    num_layers_per_track_per_sync_point=2,
    hidden_dim=32,
    attention_hidden_dim=32,
    dense_feed_forward_hidden_dim=48,
    sparse_feed_forward_hidden_dim=24,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=10000.0,
    local_attention_window_size=3,
    num_experts=4,
    num_experts_per_token=2,
)

CASES = {
    # tamm's default structure on a small geometry.
    "plain": dict(BASE),
    # Every optional norm, another layer pattern, sum combine, unscaled QK-norm, no GQA, three
    # tracks and segments.
    "norms": dict(
        BASE,
        num_tracks=3,
        num_layers_per_track=4,
        num_layers_per_track_per_sync_point=2,
        num_kv_heads=None,
        attention_layer_pattern=("global_nope", "local_rope", "local_rope"),
        feed_forward_layer_pattern=("sparse", "dense", "dense"),
        local_attention_window_size=4,
        pre_norm="pre_scale_rms_norm",
        post_norm="rms_norm",
        pre_residual_norm="rms_norm",
        tracks_dispatch_norm="rms_norm",
        tracks_combine_norm="pre_scale_rms_norm",
        tracks_combine_op="sum",
        scale_qk_norm=False,
        experts_router_logits_cap=20.0,
    ),
}


def lora_case():
    """tamm's default structure with a LoRA adapter (rank 2, α 4) on every attention and dense
    FFN projection of every track, saved inside the base checkpoint. The router is never
    adapted; the experts are not either (`adapt_moe=False`): tamm 0.2.0's own forward fails
    with expert LoRAs (its batched LoRA meets the dispatched expert inputs with mismatched
    shapes), so it cannot serve as their reference."""
    return dict(BASE, adapters={"tuned": LoRAModelAdapter(rank=2, alpha=4.0, adapt_moe=False)})


def build(seed, kw, std=0.2):
    torch.manual_seed(seed)
    cfg = AFMParallelTrackMoEConfig(**kw)
    model = cfg.create_model()
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
            elif "_transpose" in name:
                p.normal_(0.0, 0.1)  # LoRA: an update of the order of a trained adapter's
            elif "router" in name:
                p.normal_(0.0, 6.0)  # logits of order 30-100: the cap matters
            else:
                p.normal_(0.0, std)
    return cfg, model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def greedy(model, ids, n):
    out = list(ids)
    for _ in range(n):
        out.append(int(logits(model, out)[-1].argmax()))
    return out[len(ids):]


def lora_moe(out):
    """The expert-adapted model, saved as is, and its reference through merged experts."""
    kw = dict(BASE, adapters={"tuned": LoRAModelAdapter(rank=2, alpha=4.0, adapt_moe=True)})
    cfg, model = build(11, kw, 0.15)
    d = out / "lora_moe"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(tamm_json.dumps(cfg, indent=2))
    sd = model.state_dict()
    torch.save(sd, d / "model.pt")
    # tamm's model without expert adapters, the expert LoRAs merged into the expert weights.
    ref_kw = dict(BASE, adapters={"tuned": LoRAModelAdapter(rank=2, alpha=4.0, adapt_moe=False)})
    ref_model = AFMParallelTrackMoEConfig(**ref_kw).create_model()
    ref_model.eval()
    scale = 4.0 / 2
    merged, n = {}, 0
    for k in ref_model.state_dict():
        merged[k] = sd[k]
        # An expert weight (`….experts.<module>.wrapped.weight`, no adapter here) gets its LoRA.
        base = k[: -len(".wrapped.weight")]
        if ".experts." in k and k.endswith(".wrapped.weight") and f"{base}.adapters.tuned.a_transpose" in sd:
            a = sd[f"{base}.adapters.tuned.a_transpose"]  # [T, E, in, r]
            b = sd[f"{base}.adapters.tuned.b_transpose"]  # [T, E, r, out]
            merged[k] = sd[k] + scale * torch.matmul(a, b)
            n += 1
    assert n > 0, "no expert LoRA merged"
    ref_model.load_state_dict(merged, strict=True)
    ref = {}
    for k, ids in enumerate(PROMPTS):
        ref[f"ids_{k}"] = torch.tensor(ids, dtype=torch.int64)
        ref[f"logits_{k}"] = logits(ref_model, ids).contiguous()
        gen = greedy(ref_model, ids, 12)
        ref[f"gen_{k}"] = torch.tensor(gen, dtype=torch.int64)
        ref[f"full_{k}"] = logits(ref_model, ids + gen).contiguous()
    save_file(ref, str(d / "reference.safetensors"))
    return max(float(ref[f"logits_{k}"].abs().max()) for k in range(len(PROMPTS)))


def toolkit(model, cfg, d):
    """The trained adapter alone in adapter.pt, the base with B = 0 (tamm's LoRA init)."""
    d.mkdir(exist_ok=True)
    sd = model.state_dict()
    torch.save({k: v.clone() for k, v in sd.items() if ".adapters." in k}, d / "adapter.pt")
    base = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("b_transpose"):
                p.zero_()
    (d / "config.json").write_text(tamm_json.dumps(cfg, indent=2))
    torch.save(base.state_dict(), d / "model.pt")
    ref = {f"base_{k}": logits(base, ids).contiguous() for k, ids in enumerate(PROMPTS)}
    save_file(ref, str(d / "reference.safetensors"))


def load_folder(d):
    from tamm.tokenizers.afm import AFMTokenizer

    cfg = tamm_json.loads((d / "config.json").read_text())
    model = cfg.create_model()
    model.load_state_dict(torch.load(d / "model.pt"), strict=True)
    model.eval()
    tok = AFMTokenizer(vocab_path=str(d / "tokenizer.model"), user_defined_tokens=["<turn_start>", "<turn_end>"])
    return model, tok


def score(model_dir, requests, out):
    """tamm's scores of eval's requests (hf_reference.py's rules, full forwards)."""
    model, tok = load_folder(Path(model_dir))
    stops = {tok.eos_id, tok.tokenizer.piece_to_id("<turn_end>")}
    req = json.loads(Path(requests).read_text())
    results = {}
    for it in req["items"]:
        prefix = req["groups"][it["group"]]
        if "continuations" in it:
            lls = []
            for c in it["continuations"]:
                ids = prefix + it["body"] + c
                lp = torch.log_softmax(logits(model, ids), dim=-1)
                n = len(ids)
                lls.append(sum(lp[n - len(c) + k - 1, t].item() for k, t in enumerate(c)))
            results[it["key"]] = {"logliks": lls}
        else:
            seq, gen, text = prefix + it["body"], [], ""
            while len(gen) < it["max_new_tokens"]:
                nxt = int(logits(model, seq + gen)[-1].argmax())
                if nxt in stops:
                    break
                gen.append(nxt)
                text = tok.decode(gen)
                cut = [text.find(x) for x in it["stop"] if x and x in text]
                if cut:
                    text = text[: min(cut)]
                    break
            results[it["key"]] = {"generation": text}
    Path(out).write_text(json.dumps({"items": results}))


def check(model_dir, adapter_dir, out):
    """tamm's logits with a trained adapter, loaded the toolkit's way."""
    d, a = Path(model_dir), Path(adapter_dir)
    cfg = tamm_json.loads((d / "config.json").read_text())
    cfg.adapters = tamm_json.loads((a / "adapter-config.json").read_text())
    cfg.active_adapter = 0
    model = cfg.create_model()
    model.eval()
    # The base weights under the adapted model's names (`….wrapped.…`).
    base = torch.load(d / "model.pt")
    want = model.state_dict()
    sd = {k: base[k.replace(".wrapped.", ".")] for k in want if ".adapters." not in k}
    res = model.load_state_dict(sd, strict=False)
    if res.unexpected_keys or any(".adapters." not in k for k in res.missing_keys):
        raise SystemExit(f"base weights do not fit: {res}")
    res = model.load_state_dict(torch.load(a / "adapter.pt"), strict=False)
    if res.unexpected_keys:
        raise SystemExit(f"unexpected keys: {res.unexpected_keys[:5]}")
    missing = [k for k in res.missing_keys if ".adapters." in k]
    if missing:
        raise SystemExit(f"adapter tensors not in adapter.pt: {missing[:5]}")
    ref = {}
    for k, ids in enumerate(PROMPTS):
        ref[f"ids_{k}"] = torch.tensor(ids, dtype=torch.int64)
        ref[f"logits_{k}"] = logits(model, ids).contiguous()
    save_file(ref, out)


def main():
    if sys.argv[1] == "score":
        return score(*sys.argv[2:5])
    if sys.argv[1] == "check":
        return check(*sys.argv[2:5])
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    scales = {}
    for i, (name, kw) in enumerate(list(CASES.items()) + [("lora", lora_case())]):
        # The model with every norm is the more sensitive to rounding (tamm's own fp32 logits
        # are ~3e-5 from its fp64 ones at std 0.2): smaller weights.
        cfg, model = build(i, kw, 0.2 if name == "plain" else 0.15)
        d = out / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(tamm_json.dumps(cfg, indent=2))
        torch.save(model.state_dict(), d / "model.pt")
        ref = {}
        for k, ids in enumerate(PROMPTS):
            ref[f"ids_{k}"] = torch.tensor(ids, dtype=torch.int64)
            ref[f"logits_{k}"] = logits(model, ids).contiguous()
            gen = greedy(model, ids, 12)
            ref[f"gen_{k}"] = torch.tensor(gen, dtype=torch.int64)
            # Every position of prompt + continuation (for incremental decoding and batches).
            ref[f"full_{k}"] = logits(model, ids + gen).contiguous()
        save_file(ref, str(d / "reference.safetensors"))
        if name == "lora":
            toolkit(model, cfg, d / "toolkit")
        scales[name] = max(float(ref[f"logits_{k}"].abs().max()) for k in range(len(PROMPTS)))
    scales["lora_moe"] = lora_moe(out)
    # A model with tamm's AFM tokenizer beside it (the toolkit's layout) for the CLI and the
    # wheel: the text of a raw prompt's greedy continuation, stopping at EOS or <turn_end>.
    from tamm_afm import train_tokenizer

    d = out / "cli"
    d.mkdir(exist_ok=True)
    tok = train_tokenizer(d)
    cfg, model = build(7, dict(BASE, vocab_size=len(tok)))
    (d / "config.json").write_text(tamm_json.dumps(cfg, indent=2))
    torch.save(model.state_dict(), d / "model.pt")
    stops = {tok.eos_id, tok.tokenizer.piece_to_id("<turn_end>")}
    prompt = "Once upon a time"
    seq, gen = tok.encode(prompt), []
    for _ in range(12):
        nxt = int(logits(model, seq + gen)[-1].argmax())
        if nxt in stops:
            break
        gen.append(nxt)
    (d / "cli_reference.json").write_text(
        json.dumps({"prompt": prompt, "text": tok.decode(gen), "ids": gen})
    )
    meta = AFMParallelTrackMoEConfig().create_model(device="meta")
    keys = [[k, list(v.shape)] for k, v in meta.state_dict().items()]
    (out / "keys.json").write_text(json.dumps(keys))
    print(json.dumps({"max_abs_logit": scales}))


if __name__ == "__main__":
    main()
