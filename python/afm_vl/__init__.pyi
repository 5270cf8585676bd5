"""Type stubs of afm_vl (see the docstrings in afm_vl/__init__.py)."""
import os
import pathlib
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, TypedDict, Union, overload

import numpy
import PIL.Image
import torch

from . import eval as eval

__version__: str
DEFAULT_MODEL: str

PathLike = Union[str, os.PathLike[str]]
#: A path, encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF), a PIL image, or uint8 HxWx3 pixels.
ImageLike = Union[str, os.PathLike[str], bytes, bytearray, memoryview, PIL.Image.Image, numpy.ndarray]
TileMode = Literal["auto", "rapid", "balanced", "high-res"]
Message = Union[Dict[str, str], Tuple[str, str]]

class GenerationDetails(TypedDict):
    text: str
    tokens: List[int]
    stop_reason: Literal["eos", "stop_string", "max_tokens", "context_full"]
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float

class DescribeTimings(TypedDict):
    tile_s: float
    encode_s: float
    prefill_s: float
    decode_s: float

class DescriptionDetails(TypedDict):
    text: str
    mode: str
    tiles: int
    visual_tokens: int
    prompt_tokens: int
    tokens: List[int]
    generated_tokens: int
    stop_reason: Literal["eos", "stop_string", "max_tokens", "context_full"]
    timings: DescribeTimings

class TileInfo(TypedDict):
    mode: str
    tile_size: int
    source_size: Tuple[int, int]
    num_tiles: int

def default_model_dir() -> pathlib.Path: ...
def init_vlm(
    out: PathLike,
    text_model: Optional[PathLike] = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: Optional[Literal["auto", "fp32", "bf16", "fp16"]] = None,
) -> pathlib.Path: ...
def load(
    path_or_name: Optional[PathLike] = None,
    device: str = "auto",
    dtype: Optional[Literal["auto", "fp32", "bf16", "fp16"]] = None,
    *,
    seed: int = 0,
) -> Model: ...
@overload
def tile(
    image: ImageLike,
    mode: TileMode = "auto",
    *,
    stretch: bool = False,
    config: Optional[PathLike] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_side: int = 16384,
    max_mib: int = 512,
    return_boxes: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def tile(
    image: ImageLike,
    mode: TileMode = "auto",
    *,
    stretch: bool = False,
    config: Optional[PathLike] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_side: int = 16384,
    max_mib: int = 512,
    return_boxes: Literal[True],
) -> Tuple[torch.Tensor, torch.Tensor, TileInfo]: ...

class Tokenizer:
    def __init__(self, path: PathLike) -> None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token(self) -> Optional[str]: ...
    @property
    def chat_template(self) -> Optional[str]: ...
    def encode(self, text: str) -> List[int]: ...
    def decode(self, ids: Union[Iterable[int], torch.Tensor], skip_special_tokens: bool = True) -> str: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]: ...
    @overload
    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tokenize: Literal[False] = False
    ) -> str: ...
    @overload
    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, tokenize: Literal[True]
    ) -> List[int]: ...

class Model:
    @property
    def source(self) -> pathlib.Path: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> Literal["fp32", "bf16", "fp16"]: ...
    @property
    def kind(self) -> Literal["text", "vlm"]: ...
    @property
    def architecture(self) -> Literal["decoder", "ptmoe", "vlm", "smolvlm"]: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @overload
    def generate(
        self,
        prompt: Union[str, Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[None, str, Sequence[str]] = None,
        raw: bool = False,
        ignore_eos: bool = False,
        stream: Optional[Callable[[str], Any]] = None,
        return_details: Literal[False] = False,
    ) -> str: ...
    @overload
    def generate(
        self,
        prompt: Union[str, Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[None, str, Sequence[str]] = None,
        raw: bool = False,
        ignore_eos: bool = False,
        stream: Optional[Callable[[str], Any]] = None,
        return_details: Literal[True],
    ) -> GenerationDetails: ...
    def logits(self, token_ids: Union[Sequence[int], torch.Tensor]) -> torch.Tensor: ...
    def tile(self, image: ImageLike, mode: TileMode = "auto", **options: Any) -> torch.Tensor: ...
    def encode_image(self, image: ImageLike, mode: TileMode = "auto") -> torch.Tensor: ...
    @overload
    def describe(
        self,
        image: ImageLike,
        mode: TileMode = "auto",
        prompt: Optional[str] = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[None, str, Sequence[str]] = None,
        stream: Optional[Callable[[str], Any]] = None,
        return_details: Literal[False] = False,
    ) -> str: ...
    @overload
    def describe(
        self,
        image: ImageLike,
        mode: TileMode = "auto",
        prompt: Optional[str] = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[None, str, Sequence[str]] = None,
        stream: Optional[Callable[[str], Any]] = None,
        return_details: Literal[True],
    ) -> DescriptionDetails: ...
    def load_adapter(self, path: PathLike, name: Optional[str] = None) -> str: ...
    def use_adapter(self, name: Optional[str]) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    @property
    def adapters(self) -> List[str]: ...
    @property
    def active_adapter(self) -> Optional[str]: ...
