"""Reference for tamm LoRA adapters (issue 19, acceptance 5): Apple's tamm as the oracle.

usage:
  tamm_adapter.py make DIR
      DIR is a toolkit folder written by tamm_afm.py (its tokenizer is reused). Writes
      DIR/adapted: the same geometry with the toolkit's adapter spec in base-model-config.json
      (LoRAModelAdapter rank 32, alpha 16, every target tamm adapts), base-model.pt the adapted
      model's full state dict (base under `.wrapped.`) with its adapter still zero (as the
      toolkit ships it), adapter.pt a trained-like adapter (random, tensors only, what the
      toolkit's trainer saves) and reference.safetensors: tamm's logits for PROMPTS with the
      adapter loaded (load_state_dict(strict=False)) and without it. DIR/embedded: the base
      checkpoint saved with that adapter in it (tamm runs it; so must we).
  tamm_adapter.py check DIR ADAPTER_PT OUT
      tamm builds DIR's model, loads base-model.pt (strict) and ADAPTER_PT with strict=False,
      and writes its logits for PROMPTS to OUT (a safetensors file). Fails if any key of
      ADAPTER_PT is unexpected or any adapter tensor of the model is left unloaded.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tamm.adapters import LoRAModelAdapter
from tamm.models.afm_text import AFMTextV7
from tamm.utils import json as tamm_json

sys.path.insert(0, str(Path(__file__).parent))
from tamm_afm import PROMPTS, build, logits  # noqa: E402

ADAPTER_ID = "base_adapter"


def model_from(folder: Path):
    cfg = tamm_json.loads((folder / "base-model-config.json").read_text())
    model = cfg.create_model()
    model.load_state_dict(torch.load(folder / "base-model.pt"), strict=True)
    model.eval()
    return model


def load_adapter(model, path: Path):
    sd = torch.load(path)
    res = model.load_state_dict(sd, strict=False)
    if res.unexpected_keys:
        raise SystemExit(f"unexpected keys: {res.unexpected_keys[:5]}")
    missing_adapter = [k for k in res.missing_keys if ".adapters." in k]
    if missing_adapter:
        raise SystemExit(f"adapter tensors not in {path}: {missing_adapter[:5]}")


def make(root: Path):
    base_cfg = tamm_json.loads((root / "base-model-config.json").read_text())
    spec = {ADAPTER_ID: LoRAModelAdapter(rank=32, alpha=16)}
    cfg, model = build(3, base_cfg.vocab_size, adapters=spec)
    out = root / "adapted"
    out.mkdir(exist_ok=True)
    for f in ("tokenizer.model", "tokenizer-config.json"):
        shutil.copy(root / f, out / f)
    (out / "base-model-config.json").write_text(tamm_json.dumps(cfg, indent=2))
    sd = model.state_dict()
    adapter = {k: v.clone() for k, v in sd.items() if ".adapters." in k}
    torch.save(adapter, out / "adapter.pt")
    ref = {}
    for i, ids in enumerate(PROMPTS):
        ref[f"ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
        ref[f"adapted_{i}"] = logits(model, ids).contiguous()
    # The embedded folder: the same checkpoint, the adapter inside it.
    emb = root / "embedded"
    emb.mkdir(exist_ok=True)
    shutil.copy(out / "base-model-config.json", emb / "base-model-config.json")
    torch.save(sd, emb / "base-model.pt")
    # The toolkit's base: the adapter not trained yet (B = 0: tamm's LoRA initialisation).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("b_transpose"):
                p.zero_()
    torch.save(model.state_dict(), out / "base-model.pt")
    for i, ids in enumerate(PROMPTS):
        ref[f"base_{i}"] = logits(model, ids).contiguous()
    # The toolkit's way of using a trained adapter: load it over the base, strict=False.
    check = model_from(out)
    load_adapter(check, out / "adapter.pt")
    for i, ids in enumerate(PROMPTS):
        assert torch.equal(logits(check, ids), ref[f"adapted_{i}"])
    save_file(ref, str(out / "reference.safetensors"))


def check(folder: Path, adapter: Path, out: Path):
    model = model_from(folder)
    load_adapter(model, adapter)
    save_file({f"logits_{i}": logits(model, ids).contiguous() for i, ids in enumerate(PROMPTS)}, str(out))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "check":
        check(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
