"""Turn the image types the API accepts into what the native tiler takes."""
from __future__ import annotations

import os
from typing import Any, Tuple

__all__ = ["image_parts"]


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is optional
        return False
    return isinstance(obj, Image.Image)


def _is_numpy(obj: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        return False
    return isinstance(obj, np.ndarray)


def _pil_to_rgb(img: Any) -> Any:
    """8-bit RGB as the Rust loader makes it: alpha composited on white."""
    from PIL import Image

    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _numpy_parts(arr: Any) -> Tuple[str, Any, int, int]:
    import numpy as np

    if arr.dtype != np.uint8:
        raise ValueError(f"a numpy image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(
            f"a numpy image must be HxWx3 (RGB) uint8, got shape {tuple(arr.shape)}"
        )
    if arr.shape[2] == 4:  # RGBA: composite on white like the file loader
        from PIL import Image

        return _pil_parts(Image.fromarray(arr, "RGBA"))
    h, w = int(arr.shape[0]), int(arr.shape[1])
    if h == 0 or w == 0:
        raise ValueError(f"image has zero width or height ({w}×{h})")
    return ("rgb", np.ascontiguousarray(arr).tobytes(), w, h)


def _pil_parts(img: Any) -> Tuple[str, Any, int, int]:
    rgb = _pil_to_rgb(img)
    w, h = rgb.size
    if h == 0 or w == 0:
        raise ValueError(f"image has zero width or height ({w}×{h})")
    return ("rgb", rgb.tobytes(), w, h)


def image_parts(image: Any) -> Tuple[str, Any, int, int]:
    """`(kind, payload, width, height)`: a path, encoded bytes, or raw RGB8 pixels."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fspath(image), 0, 0)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(image), 0, 0)
    if _is_pil(image):
        return _pil_parts(image)
    if _is_numpy(image):
        return _numpy_parts(image)
    raise TypeError(
        "an image must be a path (str or os.PathLike), bytes, a PIL.Image or a "
        f"numpy uint8 HxWx3 array, got {type(image).__name__}"
    )
