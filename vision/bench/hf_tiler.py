"""HF reference for `afm-vl bench tiler`: images/s of transformers' LLaVA-NeXT image processor
configured as the equivalent of our high-res mode (image fitted into 1344×1344 with padding,
cut into four 672×672 patches, plus the whole image at 672×672), decode included.

Usage: python hf_tiler.py FOLDER [--limit N] [--repeat R]. Prints one JSON line.
"""

import argparse
import json
import pathlib
import time

from PIL import Image, ImageOps


def make_processor():
    kwargs = dict(
        size={"shortest_edge": 672},
        crop_size={"height": 672, "width": 672},
        image_grid_pinpoints=[[1344, 1344]],
    )
    try:  # torchvision backend (transformers' default) when torchvision is installed
        import torchvision  # noqa: F401
        from transformers import LlavaNextImageProcessor as Processor
    except ImportError:  # the PIL + numpy backend
        from transformers import LlavaNextImageProcessorPil as Processor
    proc = Processor(**kwargs)
    return proc, type(proc).__name__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="timed passes; the fastest is reported")
    args = ap.parse_args()
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    files = sorted(p for p in pathlib.Path(args.folder).iterdir() if p.suffix.lower() in exts)
    if args.limit:
        files = files[: args.limit]
    proc, name = make_processor()
    # Warm-up on one image (imports, caches).
    proc(images=[ImageOps.exif_transpose(Image.open(files[0])).convert("RGB")], return_tensors="np")
    shape = None
    best = float("inf")
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        for f in files:
            img = ImageOps.exif_transpose(Image.open(f)).convert("RGB")
            out = proc(images=[img], return_tensors="np")
            shape = list(out["pixel_values"].shape)
        best = min(best, time.perf_counter() - t0)
    dt = best
    print(json.dumps({"processor": name, "images": len(files), "seconds": dt,
                      "images_per_s": len(files) / dt, "pixel_values_shape": shape}))


if __name__ == "__main__":
    main()
