"""Reference for the SmolVLM re-implementation: HF transformers' SmolVLMForConditionalGeneration
(SigLIP-style vision encoder, pixel-shuffle connector, Llama decoder) and SmolVLMProcessor (PIL
image processor: LANCZOS resize, splitting into max_image_size tiles plus a global image,
rescale, normalise, pad; chat template; `<image>` expansion) as the oracle.

Everything is built here: random weights (seed 0), no download. The tokenizer is SmolLM2-135M-
Instruct's (`assets/models/smollm2-135m-instruct-fp32/`) with SmolVLM's special tokens added
(`<fake_token_around_image>`, `<image>`, `<end_of_utterance>`, `<global-img>`,
`<row_{r}_col_{c}>` for r, c in 1..6) and SmolVLM-Instruct's chat template.

Geometries:
  256m  SmolVLM-256M-Instruct's shape: vision 768 wide, 12 layers, 12 heads, patch 16 on 512 px
        tiles, scale factor 4 (64 image tokens per tile); SmolLM2-135M decoder (576 wide, 30
        layers, 9 heads / 3 KV heads), vocab padded to 49280, tied embeddings; the processor
        resizes the longest edge to 1024 and splits into 512 px tiles.
  alt   a smaller model with other choices: vision 384 wide, 4 layers, 6 heads, patch 14 on
        378 px tiles, scale factor 3 (81 image tokens per tile); decoder 256 wide, 4 layers,
        4 heads / 2 KV heads, vocab = len(tokenizer), untied lm_head; longest edge 1134 (3 x 378).

After HF's initialisation every LayerNorm / RMSNorm weight is re-drawn as 1 + 0.1 * randn and
every bias as 0.02 * randn, so norms and biases are not trivially 1 / 0, and the decoder gets
unit-scale embeddings and fan-in-scaled projections (its greedy continuations then vary instead of
repeating one token).

usage: smolvlm_ref.py build OUT_DIR GEOMETRY [bf16]
           GEOMETRY is `256m` or `alt`. Writes the model in HF's layout (config.json,
           generation_config.json, model.safetensors) and the processor (tokenizer files,
           processor / preprocessor config, chat template) into OUT_DIR, and prints the
           safetensors key prefixes. With `bf16` the weights are saved in bf16, as the public
           SmolVLM checkpoints are (the same random model rounded; for benchmarks).
       smolvlm_ref.py run MODEL_DIR OUT_DIR PROMPT IMAGE [IMAGE ...]
           For each image k, a one-turn user message (the image, then PROMPT) through the chat
           template with the generation prompt and the processor; writes
           OUT_DIR/ref_{k}.safetensors: `pixel_values` [N,3,S,S] f32 (N tiles incl. the global
           image), `pixel_attention_mask` [N,S,S] int64, `input_ids` [L] int64,
           `image_features` [N*image_seq_len, text_hidden] f32 (connector output),
           `logits` [L,V] f32 of one forward over the prompt, `greedy` [n] int64 (generate,
           24 new tokens at most, greedy, stopping at EOS; new tokens only), and OUT_DIR/ref.json:
           per image {image, rows, cols, prompt_text, expanded_text, greedy_text, ...}.
       smolvlm_ref.py bench MODEL_DIR DTYPE PROMPT NEW_TOKENS REPEATS IMAGE [IMAGE ...]
           Times transformers in DTYPE (fp32 or bf16, the whole model) end to end per image (PIL open, chat template, preprocessing,
           generate of exactly NEW_TOKENS greedy tokens) after one warm-up generate, over REPEATS
           rounds of all images; prints one JSON line: {"seconds_per_image", "preprocess_s"
           (medians), "images", "new_tokens", "threads"}.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers import processing_utils
from transformers.image_utils import PILImageResampling
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.video_processing_utils import VideoProcessorMixin

# Without torchvision, transformers 5 does not export VideoProcessorMixin (the class a processor's
# `video_processor` is checked against), so SmolVLMProcessor cannot be built at all; export it.
# SmolVLMVideoProcessor itself constructs without torchvision (SmolVLMProcessor.apply_chat_template
# reads its num_frames / fps); no video goes through it here.
# (processing_utils looks the name up in its own handle on the `transformers` module.)
if not hasattr(processing_utils.transformers_module, "VideoProcessorMixin"):
    processing_utils.transformers_module.VideoProcessorMixin = VideoProcessorMixin

# Two threads (the test machines' cores) unless OMP_NUM_THREADS says otherwise (`bench smolvlm` passes
# its own count).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))

REPO = Path(__file__).resolve().parents[3]
TOKENIZER_DIR = REPO / "assets/models/smollm2-135m-instruct-fp32"

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]

GEOMETRIES = {
    "256m": dict(
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=512,
        ),
        scale_factor=4,
        text=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            vocab_size=49280,
        ),
        tie=True,
        longest_edge=1024,
        max_image_size=512,
    ),
    "alt": dict(
        vision=dict(
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=6,
            patch_size=14,
            image_size=378,
        ),
        scale_factor=3,
        text=dict(
            hidden_size=256,
            intermediate_size=640,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            vocab_size=None,  # len(tokenizer)
        ),
        tie=False,
        longest_edge=1134,
        max_image_size=378,
    ),
}

MAX_NEW_TOKENS = 24


def build_tokenizer():
    for _ in range(15):
        if (TOKENIZER_DIR / "tokenizer.json").exists():
            break
        print(f"waiting for {TOKENIZER_DIR} ...", file=sys.stderr)
        time.sleep(60)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.add_special_tokens(
        {"extra_special_tokens": SPECIAL_TOKENS}, replace_extra_special_tokens=False
    )
    # As in SmolVLM-Instruct's tokenizer: a turn ends with <end_of_utterance>.
    tokenizer.add_special_tokens({"eos_token": "<end_of_utterance>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    for t in SPECIAL_TOKENS:
        ids = tokenizer.encode(t, add_special_tokens=False)
        assert len(ids) == 1, (t, ids)
    return tokenizer


def randomise_norms_and_biases(model):
    for name, module in model.named_modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        if is_norm and getattr(module, "weight", None) is not None:
            module.weight.data = 1.0 + 0.1 * torch.randn_like(module.weight)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data = 0.02 * torch.randn_like(p)


def enliven_text_model(model):
    """HF's initialisation (std 0.02 everywhere) makes a random decoder repeat one token; with
    unit-scale embeddings and fan-in-scaled projections its greedy continuations vary, so
    comparing them tests decoding with the cache."""
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.data = torch.randn_like(p)
        elif (".text_model." in name or name.startswith("lm_head")) and name.endswith("weight") and p.dim() == 2:
            p.data = torch.randn_like(p) / p.shape[1] ** 0.5


def build(out_dir, geometry, dtype="fp32"):
    g = GEOMETRIES[geometry]
    torch.manual_seed(0)
    tokenizer = build_tokenizer()

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    token_ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)

    vision_config = SmolVLMVisionConfig(
        **g["vision"], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3
    )
    text = dict(g["text"])
    if text["vocab_size"] is None:
        text["vocab_size"] = len(tokenizer)
    text_config = LlamaConfig(
        **text,
        hidden_act="silu",
        head_dim=text["hidden_size"] // text["num_attention_heads"],
        tie_word_embeddings=g["tie"],
        **token_ids,
    )
    config = SmolVLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        scale_factor=g["scale_factor"],
        image_token_id=image_token_id,
        tie_word_embeddings=g["tie"],
        pad_token_id=pad_id,
    )
    model = SmolVLMForConditionalGeneration(config).to(torch.float32)
    randomise_norms_and_biases(model)
    enliven_text_model(model)
    if g["tie"]:
        assert model.lm_head.weight is model.model.text_model.embed_tokens.weight
    model.generation_config = GenerationConfig(**token_ids)
    model.eval()

    image_seq_len = model.model.image_seq_len
    assert image_seq_len == int(
        (g["vision"]["image_size"] // g["vision"]["patch_size"]) ** 2 / g["scale_factor"] ** 2
    )
    common = dict(
        do_resize=True,
        resample=PILImageResampling.LANCZOS,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pad=True,
    )
    image_processor = SmolVLMImageProcessorPil(
        **common,
        do_image_splitting=True,
        size={"longest_edge": g["longest_edge"]},
        max_image_size={"longest_edge": g["max_image_size"]},
    )
    video_processor = SmolVLMVideoProcessor(
        **common,
        size={"longest_edge": g["max_image_size"]},
        max_image_size={"longest_edge": g["max_image_size"]},
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)

    files = sorted(out.glob("*.safetensors"))
    keys = []
    for f in files:
        with safe_open(f, "pt") as st:
            keys += list(st.keys())
    prefixes = sorted({".".join(k.split(".")[:2]) if k.startswith("model.") else k.split(".")[0] for k in keys})
    print(json.dumps({
        "geometry": geometry,
        "files": sorted(p.name for p in out.iterdir()),
        "safetensors": [f.name for f in files],
        "n_tensors": len(keys),
        "key_prefixes": prefixes,
        "image_seq_len": image_seq_len,
        "image_token_id": image_token_id,
        "len_tokenizer": len(tokenizer),
        **token_ids,
    }, indent=1))


def load(model_dir, dtype=torch.float32):
    model = SmolVLMForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    )
    model.eval()
    # SmolVLMProcessor.from_pretrained loads the video processor through AutoVideoProcessor, which
    # requires torchvision: build the processor from the saved parts instead, the image processor
    # explicitly the PIL one (processor_config.json names "SmolVLMImageProcessor", the torchvision
    # backend).
    d = Path(model_dir)
    processor_config = json.loads((d / "processor_config.json").read_text())
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil.from_pretrained(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        video_processor=SmolVLMVideoProcessor.from_pretrained(model_dir),
        image_seq_len=processor_config["image_seq_len"],
        chat_template=(d / "chat_template.jinja").read_text(),
    )
    assert type(processor.image_processor) is SmolVLMImageProcessorPil, type(processor.image_processor)
    assert processor.image_seq_len == model.model.image_seq_len
    assert processor.image_token_id == model.config.image_token_id
    return model, processor


def prompt_text(processor, prompt):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def run(model_dir, out_dir, prompt, images):
    torch.manual_seed(0)
    model, processor = load(model_dir)
    tokenizer = processor.tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Capture the text the processor tokenizes (after `<image>` expansion).
    captured = {}
    original = processor.get_text_with_replacements

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured["text"] = result[0]
        return result

    processor.get_text_with_replacements = capture

    records = []
    with torch.no_grad():
        for k, path in enumerate(images):
            img = Image.open(path).convert("RGB")
            text = prompt_text(processor, prompt)
            inputs = processor(text=text, images=[img], return_tensors="pt")
            info = processor.image_processor(images=[img], return_row_col_info=True)
            rows, cols = int(info["rows"][0][0]), int(info["cols"][0][0])

            input_ids = inputs["input_ids"]
            pixel_values = inputs["pixel_values"]
            pixel_attention_mask = inputs["pixel_attention_mask"]
            assert torch.equal(torch.as_tensor(info["pixel_values"]), pixel_values)

            feats = model.model.get_image_features(pixel_values, pixel_attention_mask).pooler_output
            image_features = torch.cat(list(feats), dim=0)
            logits = model(
                input_ids=input_ids,
                attention_mask=inputs["attention_mask"],
                pixel_values=pixel_values,
                pixel_attention_mask=pixel_attention_mask,
            ).logits[0]
            generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            greedy = generated[0, input_ids.shape[1]:]

            save_file(
                {
                    "pixel_values": pixel_values[0].contiguous().float(),
                    "pixel_attention_mask": pixel_attention_mask[0].contiguous().to(torch.int64),
                    "input_ids": input_ids[0].contiguous().to(torch.int64),
                    "image_features": image_features.contiguous().float(),
                    "logits": logits.contiguous().float(),
                    "greedy": greedy.contiguous().to(torch.int64),
                },
                str(out / f"ref_{k}.safetensors"),
            )
            expanded = captured["text"][0]
            assert tokenizer(expanded, add_special_tokens=True)["input_ids"] == input_ids[0].tolist()
            records.append({
                "image": str(path),
                "image_size": list(img.size),
                "rows": rows,
                "cols": cols,
                "n_tiles": int(pixel_values.shape[1]),
                "tile_size": int(pixel_values.shape[-1]),
                "prompt_text": text,
                "expanded_text": expanded,
                "decoded_input_ids": tokenizer.decode(input_ids[0], skip_special_tokens=False),
                "input_len": int(input_ids.shape[1]),
                "greedy": greedy.tolist(),
                "greedy_text": tokenizer.decode(greedy, skip_special_tokens=False),
            })
            print(json.dumps({k2: records[-1][k2] for k2 in (
                "image", "rows", "cols", "n_tiles", "input_len", "greedy_text")}), file=sys.stderr)
    (out / "ref.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def bench(model_dir, dtype, prompt, new_tokens, repeats, images):
    torch.manual_seed(0)
    model, processor = load(model_dir, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])

    def preprocess(path):
        img = Image.open(path).convert("RGB")
        text = prompt_text(processor, prompt)
        return processor(text=text, images=[img], return_tensors="pt")

    def generate(inputs):
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )

    with torch.no_grad():
        out = generate(preprocess(images[0]))  # warm-up
        assert out.shape[1] - preprocess(images[0])["input_ids"].shape[1] == new_tokens
        totals, pres = [], []
        for _ in range(repeats):
            for path in images:
                t0 = time.perf_counter()
                inputs = preprocess(path)
                t1 = time.perf_counter()
                out = generate(inputs)
                t2 = time.perf_counter()
                assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
                pres.append(t1 - t0)
                totals.append(t2 - t0)
    print(json.dumps({
        "seconds_per_image": statistics.median(totals),
        "preprocess_s": statistics.median(pres),
        "images": len(images),
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
    }))


def main(argv):
    if len(argv) in (3, 4) and argv[0] == "build" and argv[3:] in ([], ["bf16"]):
        build(argv[1], argv[2], *argv[3:])
    elif len(argv) >= 5 and argv[0] == "run":
        run(argv[1], argv[2], argv[3], argv[4:])
    elif len(argv) >= 7 and argv[0] == "bench":
        bench(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), argv[6:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
