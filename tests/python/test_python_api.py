"""The `afm_vl` Python package (python/, pyo3 + maturin): logits against HF transformers,
tiles against `afm-vl tile` bit for bit, tensors shared with torch without copies, errors as
Python exceptions with the CLI's messages, generation (streaming, Ctrl-C), LoRA adapters
against PEFT, the tokenizer against transformers', and `afm_vl.eval.run` against `afm-vl eval`.

`make test` builds and installs the package first (maturin develop)."""
import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest

torch = pytest.importorskip("torch")
afm_vl = pytest.importorskip("afm_vl")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets/models/smollm2-135m-instruct-fp32"
BIN = ROOT / "target/release/afm-vl"
IMAGES = sorted((ROOT / "assets/images").iterdir())
MMMLU = ROOT / "eval/tests/fixtures/mmmlu"

needs_model = pytest.mark.skipif(
    not (MODEL / "model.safetensors").exists(), reason="run `make setup` first"
)
needs_bin = pytest.mark.skipif(not BIN.exists(), reason="build first: cargo build --release")


@pytest.fixture(scope="module")
def model():
    if not (MODEL / "model.safetensors").exists():
        pytest.skip("run `make setup` first")
    return afm_vl.load(MODEL, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    if not (MODEL / "model.safetensors").exists():
        pytest.skip("run `make setup` first")
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 504, 3458, 282, 4649, 314]


# -- logits --------------------------------------------------------------------------------
def test_logits_match_hf_transformers(model, hf):
    ids = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        tokenize=True,
    )
    ours = model.logits(ids)
    assert isinstance(ours, torch.Tensor)
    assert ours.dtype == torch.float32 and ours.shape == (len(ids), hf.config.vocab_size)
    assert not ours.requires_grad
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3


def test_logits_accepts_tensors_and_checks_ids(model):
    a = model.logits(PROMPT_IDS)
    b = model.logits(torch.tensor([PROMPT_IDS], dtype=torch.int32))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="token ids must be in"):
        model.logits([0, 10**9])
    with pytest.raises(ValueError, match="empty"):
        model.logits([])


# -- tensors shared with torch -------------------------------------------------------------
def test_tensor_round_trip_is_not_copied():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    u = afm_vl._native._roundtrip(t)
    assert isinstance(u, torch.Tensor)
    assert u.data_ptr() == t.data_ptr()
    assert u.shape == t.shape and u.dtype == t.dtype
    u[0, 0] = 42.0  # the same storage: visible through t
    assert t[0, 0].item() == 42.0
    # Views keep their offset and strides; bf16 (no numpy equivalent) works too.
    v = t[:, 1:]
    assert afm_vl._native._roundtrip(v).data_ptr() == v.data_ptr()
    h = torch.ones(5, dtype=torch.bfloat16)
    assert afm_vl._native._roundtrip(h).data_ptr() == h.data_ptr()
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        afm_vl._native._roundtrip([1, 2, 3])


def test_int64_ids_are_read_in_place(model):
    ids = torch.tensor(PROMPT_IDS, dtype=torch.int64)
    before = ids.data_ptr()
    model.logits(ids)
    assert ids.data_ptr() == before and ids.tolist() == PROMPT_IDS


def test_logits_feed_a_torch_computation(model):
    with torch.no_grad():
        logits = model.logits(PROMPT_IDS)
        probs = torch.softmax(logits, dim=-1)
    assert torch.allclose(probs.sum(-1), torch.ones(len(PROMPT_IDS)), atol=1e-4)


# -- tiling --------------------------------------------------------------------------------
def cli_tile(image, mode, tmp_path, *extra):
    st = pytest.importorskip("safetensors.torch")
    out = tmp_path / f"{pathlib.Path(image).name}.{mode}.safetensors"
    subprocess.run([BIN, "-q", "tile", image, "--mode", mode, "--out", out, *extra], check=True)
    return st.load_file(out)


@needs_bin
@pytest.mark.parametrize("mode", ["auto", "rapid", "balanced", "high-res"])
def test_tile_equals_cli_bit_for_bit(tmp_path, mode):
    for image in IMAGES:
        ref = cli_tile(image, mode, tmp_path)
        pixels, boxes, info = afm_vl.tile(image, mode, return_boxes=True)
        assert pixels.dtype == torch.float32
        assert torch.equal(pixels, ref["pixel_values"]), (image, mode)
        assert torch.equal(boxes, ref["content_boxes"]), (image, mode)
        assert info["num_tiles"] == pixels.shape[0]
        # Encoded bytes take the same path as the file.
        assert torch.equal(afm_vl.tile(image.read_bytes(), mode), ref["pixel_values"])


@needs_bin
def test_tile_options_equal_cli(tmp_path):
    image = IMAGES[0]
    ref = cli_tile(image, "high-res", tmp_path, "--stretch", "--mean", "0.5", "0.5", "0.5",
                   "--std", "0.25", "0.5", "1")
    ours = afm_vl.tile(image, "high-res", stretch=True, mean=[0.5] * 3, std=[0.25, 0.5, 1])
    assert torch.equal(ours, ref["pixel_values"])


def test_tile_accepts_pil_numpy_bytes_and_paths(tmp_path, model):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (300, 900, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    ref = afm_vl.tile(path, "high-res")
    assert ref.shape == (5, 3, 672, 672)
    assert torch.equal(afm_vl.tile(str(path), "high-res"), ref)
    assert torch.equal(afm_vl.tile(path.read_bytes(), "high-res"), ref)
    assert torch.equal(afm_vl.tile(arr, "high-res"), ref)
    assert torch.equal(afm_vl.tile(Image.open(path), "high-res"), ref)
    assert torch.equal(model.tile(arr, "high-res"), ref)
    with pytest.raises(ValueError, match="uint8"):
        afm_vl.tile(arr.astype(np.float32))
    with pytest.raises(TypeError, match="an image must be"):
        afm_vl.tile(12)


# -- errors --------------------------------------------------------------------------------
def test_missing_files_raise_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        afm_vl.load(missing, device="cpu")
    img = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=str(img)):
        afm_vl.tile(img)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        afm_vl.Tokenizer(tmp_path / "nothing")


def test_bad_images_raise_value_error_with_the_reason(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image at all")
    with pytest.raises(ValueError, match="notes.jpg: not a recognised image"):
        afm_vl.tile(txt)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        afm_vl.tile(empty)
    with pytest.raises(ValueError, match="<bytes>: not a recognised image"):
        afm_vl.tile(b"hello")
    # A PNG cut in the middle: the decoder's own reason comes through.
    png = tmp_path / "cut.png"
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(png)
    cut = tmp_path / "cut2.png"
    cut.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut2.png: cannot decode PNG: .+"):
        afm_vl.tile(cut)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        afm_vl.tile(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        afm_vl.tile(png, "sideways")


@needs_bin
def test_error_messages_match_the_cli(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image at all")
    cli = subprocess.run([BIN, "tile", txt, "--out", tmp_path / "o.safetensors"],
                         capture_output=True, text=True)
    assert cli.returncode == 1
    with pytest.raises(ValueError) as e:
        afm_vl.tile(txt)
    assert cli.stderr.strip() == f"error: {e.value}"


def test_text_models_refuse_image_calls(model):
    with pytest.raises(ValueError, match="is a text model: describe and encode_image need"):
        model.describe(IMAGES[0])
    with pytest.raises(ValueError, match="is a text model"):
        model.encode_image(IMAGES[0])


def test_bad_arguments_raise_value_error(model):
    with pytest.raises(ValueError, match="unknown device"):
        afm_vl.load(MODEL, device="tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        afm_vl.load(MODEL, device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="temperature"):
        model.generate("hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", top_p=0)


# -- generation ----------------------------------------------------------------------------
@needs_bin
def test_default_model_is_the_native_blocks_and_equals_cli(model, monkeypatch):
    """`afm_vl.load()` with no path takes the default model, the GGUF's Q4_1 blocks as set-up
    keeps them: its prompt logits follow the fp32 conversion of the same weights (the prompt
    runs with the blocks dequantised, exactly those weights), it answers Paris, and its greedy
    text equals the CLI's default."""
    monkeypatch.delenv("AFM_VL_MODEL", raising=False)
    monkeypatch.chdir(ROOT)
    assert afm_vl.default_model_dir().resolve() == (ROOT / afm_vl.DEFAULT_MODEL).resolve()
    # fp32 for the logits (explicitly: the default is fp32 on a CPU, asserted below).
    native32 = afm_vl.load(device="cpu", dtype="fp32")
    assert native32.source.resolve() == (ROOT / afm_vl.DEFAULT_MODEL).resolve()
    a, b = native32.logits(PROMPT_IDS), model.logits(PROMPT_IDS)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()
    # The defaults (device, dtype) of the wheel and of the CLI give the same text.
    native = afm_vl.load(device="cpu")
    # On a CPU the default is fp32 (the fused decode step), even where bf16 is native.
    assert native.dtype == "fp32"
    prompt = "What is the capital of France?"
    text = native.generate(prompt, max_tokens=12)
    assert "Paris" in text
    cli = subprocess.run(
        [BIN, "-q", "--device", "cpu", "generate", "--max-tokens", "12", prompt],
        check=True, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                         if k != "AFM_VL_MODEL"},
    )
    assert text + "\n" == cli.stdout


@needs_bin
def test_generate_equals_cli(model):
    prompt = "What is the capital of France?"
    cli = subprocess.run(
        [BIN, "-q", "--device", "cpu", "generate", "--model", MODEL, "--dtype", "fp32",
         "--max-tokens", "12", prompt],
        check=True, capture_output=True, text=True,
    )
    assert model.generate(prompt, max_tokens=12) + "\n" == cli.stdout


def test_generate_streams_stops_and_samples(model):
    prompt = "Count from 1 to 20, separated by commas."
    pieces = []
    out = model.generate(prompt, max_tokens=16, stream=pieces.append, return_details=True)
    assert "".join(pieces) == out["text"] and "3" in out["text"]
    assert out["generated_tokens"] == len(out["tokens"]) == 16
    assert out["stop_reason"] == "max_tokens"
    stopped = model.generate(prompt, max_tokens=16, stop=["3"], return_details=True)
    assert stopped["stop_reason"] == "stop_string"
    assert out["text"].startswith(stopped["text"]) and "3" not in stopped["text"]
    a = model.generate("Tell me a story.", max_tokens=6, temperature=0.9, top_p=0.9, seed=7)
    b = model.generate("Tell me a story.", max_tokens=6, temperature=0.9, top_p=0.9, seed=7)
    assert a == b
    chat = model.generate([{"role": "user", "content": "Tell me a story."}], max_tokens=6)
    assert chat == model.generate("Tell me a story.", max_tokens=6)


def test_stream_callback_errors_propagate(model):
    def boom(piece):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        model.generate("Tell me a story.", max_tokens=16, stream=boom)


def test_ctrl_c_interrupts_a_long_generation(model):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate("Once upon a time", raw=True, max_tokens=3000, ignore_eos=True)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 30
    # The model is still usable afterwards.
    assert model.generate("Hi", max_tokens=2)


def test_gil_is_released_during_generation(model):
    done = threading.Event()
    ticks = 0

    def work():
        model.generate("Once upon a time", raw=True, max_tokens=8, ignore_eos=True)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    th.join()
    assert ticks > 10


# -- adapters --------------------------------------------------------------------------------
def test_lora_adapter_matches_peft(model, hf, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)
        ref = pm(torch.tensor([PROMPT_IDS])).logits[0]
    pm.save_pretrained(tmp_path / "ad")
    pm.unload()  # take the LoRA layers out of the shared hf model again
    base = model.logits(PROMPT_IDS)
    assert model.load_adapter(tmp_path / "ad", "mine") == "mine"
    assert model.adapters == ["mine"] and model.active_adapter is None
    model.use_adapter("mine")
    try:
        adapted = model.logits(PROMPT_IDS)
        assert model.active_adapter == "mine"
        assert (adapted - base).abs().max().item() > 1e-2
        assert (adapted - ref).abs().max().item() <= 1e-3
    finally:
        model.use_adapter(None)
    assert torch.equal(model.logits(PROMPT_IDS), base)
    model.unload_adapter("mine")
    assert model.adapters == []
    with pytest.raises(ValueError, match="no cached adapter"):
        model.use_adapter("mine")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        model.load_adapter(tmp_path / "nowhere")


# -- vision-language model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    if not (MODEL / "model.safetensors").exists():
        pytest.skip("run `make setup` first")
    return afm_vl.init_vlm(tmp_path_factory.mktemp("vlm") / "ckpt", MODEL, seed=1)


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return afm_vl.load(vlm_dir, device="cpu", dtype="fp32")


def test_encode_image_feeds_a_torch_computation(vlm):
    assert vlm.kind == "vlm"
    tiles = vlm.tile(IMAGES[0], "high-res")
    v = vlm.encode_image(IMAGES[0], "high-res")
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and not v.requires_grad
    assert v.shape[0] % tiles.shape[0] == 0 and v.shape[1] == vlm.config["hidden_size"]
    with torch.no_grad():
        proj = torch.nn.functional.normalize(v, dim=-1) @ torch.randn(v.shape[1], 8)
        sim = v @ v.T
    assert proj.shape == (v.shape[0], 8) and torch.isfinite(sim).all()
    assert torch.equal(vlm.encode_image(IMAGES[0].read_bytes(), "high-res"), v)


@needs_bin
def test_describe_equals_cli(vlm, vlm_dir):
    image = IMAGES[0]
    cli = subprocess.run(
        [BIN, "-q", "--device", "cpu", "describe", "--model", vlm_dir, "--dtype", "fp32",
         "--max-tokens", "8", "--mode", "high-res", "--json", image],
        capture_output=True, text=True,
    )
    if cli.returncode == 2:
        pytest.skip("this afm-vl binary has no describe yet")
    assert cli.returncode == 0, cli.stderr
    ref = json.loads(cli.stdout)
    pieces = []
    d = vlm.describe(image, "high-res", max_tokens=8, stream=pieces.append,
                     return_details=True)
    assert d["text"] == ref["description"]
    for key in ("mode", "tiles", "visual_tokens", "prompt_tokens", "generated_tokens"):
        assert d[key] == ref[key], key
    assert "".join(pieces).strip() == d["text"]
    # Text prompts on a VLM see the text model as loaded (image LoRA off).
    assert torch.equal(vlm.logits(PROMPT_IDS), afm_vl.load(MODEL, device="cpu",
                                                           dtype="fp32").logits(PROMPT_IDS))
    with pytest.raises(ValueError, match="LoRA adapters are for text models"):
        vlm.load_adapter(vlm_dir)


# -- tokenizer -------------------------------------------------------------------------------
@needs_model
def test_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(MODEL)
    tok = afm_vl.Tokenizer(MODEL)
    text = "Hello world! The quick brown fox jumps over 2024 lazy dogs."
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    assert tok.vocab_size == len(ref)
    assert tok.eos_token == ref.eos_token
    assert tok.token_to_id(tok.eos_token) == ref.eos_token_id


# -- eval ------------------------------------------------------------------------------------
@needs_bin
@needs_model
def test_eval_run_equals_cli(tmp_path):
    cli_out = tmp_path / "cli"
    subprocess.run([BIN, "-q", "--device", "cpu", "eval", MMMLU, "--model", MODEL, "--limit", "2",
                    "--out", cli_out], check=True)
    cli = json.loads((cli_out / "results.json").read_text())
    ours = afm_vl.eval.run(MMMLU, MODEL, device="cpu", limit=2, out=tmp_path / "py")
    for key in ("model", "config", "fingerprint", "data", "skipped", "tasks", "items"):
        assert ours[key] == cli[key], key
    assert ours["tasks"]["mmmlu"]["n"] == 4
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        afm_vl.eval.run(tmp_path / "no-such-folder", MODEL, device="cpu")


# -- Apple's tamm checkpoints ----------------------------------------------------------
@pytest.fixture(scope="module")
def tamm_folder(tmp_path_factory):
    """A toolkit folder written by tamm itself (text/tests/reference/tamm_afm.py), with an
    adapted variant (tamm_adapter.py): tamm's logits and greedy texts beside it."""
    pytest.importorskip("tamm")
    safetensors = pytest.importorskip("safetensors.torch")
    d = tmp_path_factory.mktemp("tamm")
    ref = ROOT / "text/tests/reference"
    import sys
    subprocess.run([sys.executable, ref / "tamm_afm.py", d], check=True, capture_output=True)
    subprocess.run([sys.executable, ref / "tamm_adapter.py", "make", d], check=True, capture_output=True)
    return d, safetensors.load_file(d / "reference.safetensors"), safetensors.load_file(
        d / "adapted/reference.safetensors")


def test_tamm_folder_logits_greedy_and_adapter(tamm_folder):
    d, ref, adapted_ref = tamm_folder
    m = afm_vl.load(d, device="cpu", dtype="fp32")
    for i in range(3):
        ids = ref[f"ids_{i}"]
        assert (m.logits(ids) - ref[f"logits_{i}"]).abs().max().item() <= 1e-4
    # Greedy text equals tamm's (and the CLI's, tests/cli_tamm.rs).
    cli = json.loads((d / "cli_reference.json").read_text())
    assert m.generate(cli["prompt"], raw=True, max_tokens=32) == cli["text"]
    # The toolkit's adapter checkpoint: tamm's adapted logits.
    a = afm_vl.load(d / "adapted", device="cpu", dtype="fp32")
    assert a.load_adapter(d / "adapted/adapter.pt", "toolkit") == "toolkit"
    a.use_adapter("toolkit")
    for i in range(3):
        got = a.logits(adapted_ref[f"ids_{i}"])
        assert (got - adapted_ref[f"adapted_{i}"]).abs().max().item() <= 1e-4
    a.use_adapter(None)
    assert (a.logits(adapted_ref["ids_0"]) - adapted_ref["base_0"]).abs().max().item() <= 1e-4


# -- the server model (PT-MoE) from tamm -----------------------------------------------------
@pytest.fixture(scope="module")
def tamm_ptmoe(tmp_path_factory):
    """PT-MoE models built and saved by tamm (text/tests/reference/tamm_ptmoe.py): tamm's
    logits, greedy text and a toolkit adapter beside them."""
    pytest.importorskip("tamm")
    import sys

    d = tmp_path_factory.mktemp("ptmoe")
    subprocess.run([sys.executable, ROOT / "text/tests/reference/tamm_ptmoe.py", d], check=True,
                   capture_output=True)
    return d


def test_tamm_pt_moe_logits_greedy_adapter_and_eval(tamm_ptmoe, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    d = tamm_ptmoe
    for case in ("plain", "norms", "lora"):
        m = afm_vl.load(d / case, device="cpu", dtype="fp32")
        assert (m.kind, m.architecture) == ("text", "ptmoe")
        assert m.config["model_type"] == "afm_ptmoe"
        ref = safetensors.load_file(d / case / "reference.safetensors")
        for k in range(3):
            assert (m.logits(ref[f"ids_{k}"]) - ref[f"logits_{k}"]).abs().max().item() <= 1e-4, case
            # Every position of prompt + tamm's greedy continuation (a wrapped window).
            full = torch.cat([ref[f"ids_{k}"], ref[f"gen_{k}"]])
            assert (m.logits(full) - ref[f"full_{k}"]).abs().max().item() <= 1e-4, case
    # Greedy text through tamm's AFM tokenizer equals tamm's (and the CLI's, tests/cli_ptmoe.rs).
    cli_dir = d / "cli"
    m = afm_vl.load(cli_dir, device="cpu", dtype="fp32")
    cli = json.loads((cli_dir / "cli_reference.json").read_text())
    assert m.generate(cli["prompt"], raw=True, max_tokens=12) == cli["text"]
    # The folder's tokenizer is tamm's: it decodes tamm's tokens to tamm's text.
    assert m.tokenizer.decode(cli["ids"]) == cli["text"]
    # The toolkit's adapter file over its base: tamm's adapted logits, and back.
    base = afm_vl.load(d / "lora/toolkit", device="cpu", dtype="fp32")
    adapted = safetensors.load_file(d / "lora/reference.safetensors")
    plain = safetensors.load_file(d / "lora/toolkit/reference.safetensors")
    assert base.load_adapter(d / "lora/toolkit/adapter.pt", "toolkit") == "toolkit"
    base.use_adapter("toolkit")
    for k in range(3):
        got = base.logits(adapted[f"ids_{k}"])
        assert (got - adapted[f"logits_{k}"]).abs().max().item() <= 1e-4
    base.use_adapter(None)
    assert (base.logits(adapted["ids_0"]) - plain["base_0"]).abs().max().item() <= 1e-4
    # eval from Python = the CLI's eval on the same folder.
    if BIN.exists():
        out = tmp_path / "cli"
        subprocess.run([BIN, "-q", "--device", "cpu", "eval", MMMLU, "--model", cli_dir, "--dtype",
                        "fp32", "--limit", "2", "--out", out], check=True)
        want = json.loads((out / "results.json").read_text())
        got = afm_vl.eval.run(MMMLU, cli_dir, device="cpu", dtype="fp32", limit=2,
                              out=tmp_path / "py")
        for key in ("model", "config", "data", "tasks", "items"):
            assert got[key] == want[key], key


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    """A random SmolVLM (the second geometry of fusion/tests/reference/smolvlm_ref.py) saved by
    transformers in HF layout, with transformers' outputs for the poster image."""
    pytest.importorskip("transformers")
    pytest.importorskip("num2words")
    import sys

    d = tmp_path_factory.mktemp("smolvlm")
    script = ROOT / "fusion/tests/reference/smolvlm_ref.py"
    subprocess.run([sys.executable, script, "build", d / "model", "alt"], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, script, "run", d / "model", d / "ref", "Describe this image.",
                    ROOT / "assets/images/poster.png"], check=True, capture_output=True)
    return d


def test_smolvlm_describe_and_encode_match_transformers(smolvlm):
    safetensors = pytest.importorskip("safetensors.torch")
    m = afm_vl.load(smolvlm / "model", device="cpu", dtype="fp32")
    assert (m.kind, m.architecture) == ("vlm", "smolvlm")
    ref = safetensors.load_file(smolvlm / "ref/ref_0.safetensors")
    meta = json.loads((smolvlm / "ref/ref.json").read_text())[0]
    poster = ROOT / "assets/images/poster.png"
    # A path, a PIL image and a numpy array give transformers' image features.
    for image in (poster, Image.open(poster), np.asarray(Image.open(poster).convert("RGB"))):
        feats = m.encode_image(image)
        assert (feats - ref["image_features"]).abs().max().item() <= 1e-4
    d = m.describe(poster, prompt="Describe this image.", max_tokens=24, return_details=True)
    assert d["tokens"] == ref["greedy"].tolist()
    assert d["text"] == meta["greedy_text"].strip()
    assert d["mode"] == f"{meta['rows']}x{meta['cols']}+global"
    assert d["prompt_tokens"] == ref["input_ids"].numel()
    with pytest.raises(ValueError, match="mode"):
        m.describe(poster, mode="rapid")
