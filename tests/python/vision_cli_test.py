"""`afm-vl tile` end to end: tensor shape and pixels against a PIL bicubic reference, and bad
input (0-byte file, text renamed .jpg, a directory, a missing path) → exit 1 with a one-line
error naming the file, never a panic. Skipped when the release binary is not built."""
import pathlib
import subprocess

import pytest

np = pytest.importorskip("numpy")
PIL = pytest.importorskip("PIL.Image")
st = pytest.importorskip("safetensors.numpy")

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "target/release/afm-vl"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.2686295, 0.2613026, 0.2757771], np.float32)

pytestmark = pytest.mark.skipif(not BIN.exists(), reason="build first: cargo build --release")


def place(img, side):
    w, h = img.size
    if w >= h:
        nw, nh = side, min(side, max(1, (h * side * 2 + w) // (2 * w)))
    else:
        nw, nh = min(side, max(1, (w * side * 2 + h) // (2 * h))), side
    r = img.resize((nw, nh), PIL.BICUBIC)
    r = (np.asarray(r, np.float32) / 255.0 - MEAN) / STD
    canvas = np.zeros((side, side, 3), np.float32)
    ox, oy = (side - nw) // 2, (side - nh) // 2
    canvas[oy:oy + nh, ox:ox + nw] = r
    return canvas.transpose(2, 0, 1)


def test_tile_high_res_matches_pil(tmp_path):
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 900)[None, :, None]
    arr = (x + rng.integers(0, 60, (500, 900, 3))).clip(0, 255).astype(np.uint8)
    src = tmp_path / "img.png"
    PIL.fromarray(arr).save(src)
    out = tmp_path / "tiles.safetensors"
    r = subprocess.run([BIN, "tile", src, "--mode", "high-res", "--out", out],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = st.load_file(out)
    assert t["pixel_values"].shape == (5, 3, 672, 672)
    assert t["content_boxes"].shape == (5, 4)
    img = PIL.open(src).convert("RGB")
    big = place(img, 1344)
    ref = np.stack([big[:, r * 672:(r + 1) * 672, c * 672:(c + 1) * 672]
                    for r in range(2) for c in range(2)] + [place(img, 672)])
    assert np.abs(t["pixel_values"] - ref).mean() <= 0.02


@pytest.mark.parametrize("kind", ["empty", "text", "directory", "missing"])
def test_bad_input_is_a_clean_error(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "directory":
        path.mkdir()
    r = subprocess.run([BIN, "tile", path, "--out", tmp_path / "o.safetensors"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "bad.jpg" in lines[0]
    assert "panicked" not in r.stderr
