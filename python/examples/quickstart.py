# %% [markdown]
# # afm_vl quickstart
#
# Notebook-style (`# %%` cells: VS Code, Jupyter via jupytext, or just
# `python python/examples/quickstart.py`). Needs `make setup` (the default model) and
# `make python` (builds and installs the package into `.venv`).

# %%
import pathlib

import torch

import afm_vl

ROOT = pathlib.Path(__file__).resolve().parents[2] if "__file__" in globals() else pathlib.Path.cwd()
IMAGES = ROOT / "assets" / "images"

# %% [markdown]
# ## Load the default text model (SmolLM2-135M-Instruct) and generate

# %%
model = afm_vl.load(device="cpu", dtype="fp32")
print(model)
print(model.generate("What is the capital of France?", max_tokens=32))

# %% Streaming, sampling and stop strings
model.generate(
    "Write a haiku about the sea.",
    max_tokens=48,
    temperature=0.7,
    top_p=0.9,
    seed=3,
    stop=["\n\n"],
    stream=lambda piece: print(piece, end="", flush=True),
)
print()

# %% [markdown]
# ## Logits are torch tensors (fp32, [seq, vocab])

# %%
tok = model.tokenizer
ids = tok.apply_chat_template([{"role": "user", "content": "2 + 2 ="}], tokenize=True)
logits = model.logits(ids)
top = torch.topk(torch.softmax(logits[-1], -1), 5)
for p, i in zip(top.values.tolist(), top.indices.tolist()):
    print(f"{p:.3f} {tok.decode([i])!r}")

# %% [markdown]
# ## Tiling: what the vision encoder sees (same tensor as `afm-vl tile`)

# %%
for path in sorted(IMAGES.iterdir()):
    pixels, boxes, info = afm_vl.tile(path, mode="auto", return_boxes=True)
    print(path.name, info, tuple(pixels.shape))

# PIL images, numpy arrays and encoded bytes work too.
import numpy as np  # noqa: E402

arr = np.zeros((480, 640, 3), np.uint8)
print(afm_vl.tile(arr, mode="balanced").shape)

# %% [markdown]
# ## Errors are ordinary Python exceptions

# %%
try:
    afm_vl.tile("does-not-exist.jpg")
except FileNotFoundError as e:
    print("FileNotFoundError:", e)
try:
    afm_vl.tile(b"definitely not an image")
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## Evaluation, as `afm-vl eval` (results.json as a dict)

# %%
fixture = ROOT / "eval" / "tests" / "fixtures" / "mmmlu"
if fixture.exists():
    results = afm_vl.eval.run(fixture, limit=1, device="cpu")
    for task, summary in results["tasks"].items():
        print(task, f"micro {summary['micro']:.2f}", f"n={summary['n']}")

# %% [markdown]
# ## Vision-language model
#
# A VLM checkpoint is a directory whose config.json has `vision` and `adapter` sections
# (`make setup` trains the demo one into assets/models/afm-vl-demo). Without it, write an
# untrained one of the same architecture: its descriptions are noise, but every call works.

# %%
import tempfile  # noqa: E402

demo = ROOT / "assets" / "models" / "afm-vl-demo"
if not (demo / "vision_adapter.safetensors").exists():
    demo = afm_vl.init_vlm(pathlib.Path(tempfile.mkdtemp()) / "untrained-vlm", seed=0)
vlm = afm_vl.load(demo, device="cpu", dtype="fp32")
image = IMAGES / "chart.png"
print(vlm.describe(image, mode="balanced", max_tokens=32))
tokens = vlm.encode_image(image, mode="high-res")  # [tiles × tokens_per_tile, hidden], fp32
print(tuple(tokens.shape), tokens.dtype)

# %% Visual tokens are plain torch tensors: e.g. their similarity to the word embeddings
with torch.no_grad():
    sims = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(
        tokens.mean(0, keepdim=True), dim=-1
    ).T
print("mean cosine to the average visual token:", sims.mean().item())

# On a text model, describe/encode_image raise ValueError.
try:
    model.describe(image)
except ValueError as e:
    print("ValueError:", e)
