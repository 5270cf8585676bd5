"""Inputs for the tamm tests (text/tests/tamm_parity.rs, tests/cli_tamm.rs).

usage: tamm_cases.py shapes            -> JSON [[name, shape], ...] of tamm's default AFMTextV7
       tamm_cases.py bad OUT_DIR MARKER -> one broken toolkit folder per case under OUT_DIR
       tamm_cases.py big OUT_DIR        -> a toolkit folder of tamm's default (3B) AFMTextV7 in
                                           fp32 (12.4 GB; small random weights, the head tied)

The `evil-global` case holds a pickle that would run `touch MARKER` if it were unpickled; a
reader that executes pickles creates the marker file.
"""

import io
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import torch
from tamm.models.afm_text import AFMTextV7
from tamm.utils import json as tamm_json


def shapes():
    model = AFMTextV7.Config(device="meta").create_model()
    print(json.dumps([[k, list(v.shape)] for k, v in model.state_dict().items()]))


def big(out: Path):
    cfg = AFMTextV7.Config()
    meta = cfg.create_model(device="meta").state_dict()
    torch.manual_seed(0)
    state = {}
    for k, v in meta.items():
        if k == "output_transform.weight":
            state[k] = state["embedding.weight"]  # tied: one storage in the file, as tamm saves it
        elif k.endswith("norm.weight"):
            state[k] = torch.ones(v.shape)
        else:
            state[k] = torch.empty(v.shape).uniform_(-0.02, 0.02)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base-model-config.json").write_text(tamm_json.dumps(cfg, indent=2))
    torch.save(state, out / "base-model.pt")


def small():
    torch.manual_seed(1)
    cfg = AFMTextV7.Config(
        vocab_size=64, hidden_dim=32, num_layers=3, num_kv_reuse_layers=1, num_heads=4
    )
    return cfg, cfg.create_model()


def folder(root, name, cfg, state):
    d = root / name
    d.mkdir(parents=True)
    (d / "base-model-config.json").write_text(tamm_json.dumps(cfg, indent=2))
    if state is not None:
        torch.save(state, d / "base-model.pt")
    return d


def replace_pickle(pt: Path, data: bytes):
    """Rewrite a torch.save zip with another data.pkl (stored, like torch writes it)."""
    src = zipfile.ZipFile(pt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = data if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, body)
    pt.write_bytes(buf.getvalue())


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def bad(out: Path, marker: str):
    if out.exists():
        shutil.rmtree(out)
    cfg, model = small()
    sd = model.state_dict()
    good = folder(out, "good", cfg, sd)

    d = folder(out, "truncated", cfg, sd)
    b = (d / "base-model.pt").read_bytes()
    (d / "base-model.pt").write_bytes(b[: len(b) // 2])

    d = folder(out, "non-tensor", cfg, None)
    torch.save({**sd, "note": "hello"}, d / "base-model.pt")

    d = folder(out, "evil-global", cfg, sd)
    replace_pickle(d / "base-model.pt", pickle.dumps({"embedding.weight": Evil(marker)}, protocol=2))

    d = folder(out, "bad-opcode", cfg, sd)
    replace_pickle(d / "base-model.pt", b"\x80\x02\xff.")

    d = folder(out, "unknown-type", cfg, sd)
    c = json.loads((d / "base-model-config.json").read_text())
    c["__tamm_type__"] = "module_configs:AFMVisionV9Config"
    (d / "base-model-config.json").write_text(json.dumps(c))

    d = folder(out, "missing-tensor", cfg, {k: v for k, v in sd.items() if "segment_1.layer_0.attention.q_transform" not in k})

    wrong = dict(sd)
    wrong["layers.segment_0.layer_1.feed_forward.output_transform.weight"] = torch.zeros(32, 7)
    folder(out, "wrong-shape", cfg, wrong)

    d = folder(out, "no-weights", cfg, None)
    print(json.dumps({"good": str(good)}))


if __name__ == "__main__":
    if sys.argv[1] == "shapes":
        shapes()
    elif sys.argv[1] == "big":
        big(Path(sys.argv[2]))
    else:
        bad(Path(sys.argv[2]), sys.argv[3])
