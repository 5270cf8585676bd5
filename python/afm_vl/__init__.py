"""afm_vl: the afm-vl pipeline (text decoder, tiler, evaluation) from Python.

Built on the same libtorch as the ``torch`` package: tensors go back and forth without copies.

    >>> import afm_vl
    >>> model = afm_vl.load()                      # the default SmolLM2-135M-Instruct
    >>> model.generate("What is the capital of France?", max_tokens=16)
    >>> model.logits([1, 2, 3]).shape              # torch.Size([3, 49152]), fp32
    >>> afm_vl.tile("assets/images/chart.png", mode="high-res").shape
    >>> afm_vl.eval.run("path/to/mmlu", limit=2)   # results.json as a dict

Errors are Python exceptions carrying the CLI's messages: a missing file raises
``FileNotFoundError`` naming it, an image the decoders reject raises ``ValueError``.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch  # noqa: F401  (loads libtorch and its Python bindings before the extension)

from . import _native
from ._images import image_parts

__all__ = [
    "load",
    "init_vlm",
    "Model",
    "Tokenizer",
    "tile",
    "eval",
    "default_model_dir",
    "DEFAULT_MODEL",
]
__version__ = "0.1.0"

#: The default text model, as ``make setup`` converts it (relative to the repository root).
DEFAULT_MODEL = "assets/models/smollm2-135m-instruct"

PathLike = Union[str, "os.PathLike[str]"]


def _roots() -> List[pathlib.Path]:
    """Folders that may hold ``assets/models``: the working directory and the folders above
    it, then those above this package (a virtualenv inside the repository)."""
    out: List[pathlib.Path] = []
    for start in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if d not in out:
                out.append(d)
    return out


def default_model_dir() -> pathlib.Path:
    """``$AFM_VL_MODEL``, else ``assets/models/smollm2-135m-instruct`` in the first of the
    working directory, its parents, or the parents of this package that has one."""
    env = os.environ.get("AFM_VL_MODEL")
    if env:
        return pathlib.Path(env)
    for root in _roots():
        cand = root / DEFAULT_MODEL
        if (cand / "config.json").exists():
            return cand
    return pathlib.Path(DEFAULT_MODEL)


def _resolve(path_or_name: Optional[PathLike]) -> pathlib.Path:
    if path_or_name is None:
        return default_model_dir()
    p = pathlib.Path(os.fspath(path_or_name))
    if p.exists() or len(p.parts) != 1:
        return p
    # A bare name: a folder of assets/models/ in the repository.
    for root in _roots():
        cand = root / "assets" / "models" / p
        if (cand / "config.json").exists():
            return cand
    return p


def _is_vlm_dir(path: pathlib.Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    smolvlm = cfg.get("model_type") in ("smolvlm", "idefics3")
    return smolvlm or ("vision" in cfg and "adapter" in cfg)


def init_vlm(
    out: PathLike,
    text_model: Optional[PathLike] = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: Optional[str] = None,
) -> pathlib.Path:
    """Write an untrained vision-language checkpoint to ``out`` (config.json +
    vision_adapter.safetensors): the demo architecture (small register-window ViT, adapter,
    image LoRA) around ``text_model`` (default: the default text model), initialised from
    ``seed``. ``afm_vl.load(out)`` loads it; ``afm-vl train demo`` trains one."""
    text_dir = _resolve(text_model)
    _native.init_vlm(os.fspath(out), os.fspath(text_dir), seed, device, dtype)
    return pathlib.Path(out)


def load(
    path_or_name: Optional[PathLike] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    *,
    seed: int = 0,
) -> "Model":
    """Load a model.

    ``path_or_name``: a text-model directory (config.json, model.safetensors,
    tokenizer.json), a tamm model folder (Apple's adapter toolkit ``assets/``:
    base-model-config.json, base-model.pt, tokenizer.model), a PT-MoE server model (ours, or a
    tamm folder: config.json with ``AFMParallelTrackMoEConfig`` + a ``.pt``), a vision-language checkpoint directory (config.json with a ``vision``
    section, vision_adapter.safetensors; ``describe`` and ``encode_image`` need one), a
    SmolVLM / Idefics3 checkpoint in HF layout (``model_type`` ``smolvlm``: config.json,
    model.safetensors, tokenizer.json, processor config; real photo descriptions), the name of a folder of ``assets/models/``, ``"preset:NAME"`` for a
    preset with random weights (seeded by ``seed``), or None for the default model
    (``$AFM_VL_MODEL`` or the converted SmolLM2-135M-Instruct).
    ``device``: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    ``dtype``: None/``auto``, ``fp32``, ``bf16``, ``fp16``. ``auto``: fp32 on a CPU (the fused
    decode step reads fp32 and quantized weights), bf16 on a GPU; a PT-MoE model or a SmolVLM
    encoder: bf16 on a GPU and where the CPU's bf16 matrix products measure faster than fp32
    ones, else fp32.

    Raises FileNotFoundError when the directory does not exist, ValueError for a bad
    checkpoint, device or dtype.
    """
    if isinstance(path_or_name, str) and path_or_name.startswith("preset:"):
        name = path_or_name[len("preset:"):]
        return Model(_native.Model.from_preset(name, seed, device, dtype))
    path = _resolve(path_or_name)
    if _is_vlm_dir(path):
        return Model(_native.Model.load_vlm(os.fspath(path), device, dtype))
    return Model(_native.Model.load(os.fspath(path), device, dtype))


def _ids_tensor(token_ids: Any) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        t = token_ids
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dtype != torch.int64:
            if t.is_floating_point() or t.is_complex():
                raise TypeError(f"token ids must be integers, got {t.dtype}")
            t = t.to(torch.int64)
        return t.detach()
    try:
        return torch.as_tensor(list(token_ids), dtype=torch.int64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"token ids must be a sequence of ints or a 1-D integer tensor ({e})"
        ) from None


def tile(
    image: Any,
    mode: str = "auto",
    *,
    stretch: bool = False,
    config: Optional[PathLike] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_side: int = 16384,
    max_mib: int = 512,
    return_boxes: bool = False,
    _base: Optional[str] = None,
) -> Any:
    """Tile an image as the vision encoder sees it: ``[tiles, 3, S, S]`` float32, identical
    to ``afm-vl tile IMAGE --mode MODE``'s ``pixel_values``.

    ``image``: a path, encoded bytes, a PIL.Image or a numpy uint8 HxWx3 array.
    ``mode``: ``rapid`` (224), ``balanced`` (one 672 thumbnail), ``high-res`` (four 672 crops
    then the thumbnail), ``auto`` (high-res when a side exceeds 672 px). The other options
    are the CLI's flags. With ``return_boxes=True`` returns ``(pixel_values,
    content_boxes [tiles, 4] int64, info dict)``.
    """
    kind, payload, w, h = image_parts(image)
    pixels, boxes, info = _native.tile(
        kind,
        payload,
        w,
        h,
        mode,
        stretch,
        os.fspath(config) if config is not None else None,
        list(mean) if mean is not None else None,
        list(std) if std is not None else None,
        max_side,
        max_mib,
        _base,
    )
    if return_boxes:
        return pixels, boxes, info
    return pixels


def _stops(stop: Union[None, str, Sequence[str]]) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return [str(s) for s in stop]


class Tokenizer:
    """A model's tokenizer (tokenizer.json) and chat template.

    ``Tokenizer(path)`` loads the files of a model directory.
    """

    def __init__(self, path: PathLike):
        self._tok = _native.Tokenizer(os.fspath(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    @property
    def eos_token(self) -> Optional[str]:
        return self._tok.eos_token

    @property
    def chat_template(self) -> Optional[str]:
        return self._tok.chat_template

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a sequence of ints or a 1-D tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> Optional[str]:
        return self._tok.id_to_token(id)

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> Union[str, List[int]]:
        """Render the chat template (HF semantics) over ``messages``: dicts with ``role``
        and ``content``, or ``(role, content)`` pairs. ``tokenize=True`` returns ids."""
        pairs = []
        for m in messages:
            if isinstance(m, dict):
                pairs.append((str(m["role"]), str(m["content"])))
            else:
                role, content = m
                pairs.append((str(role), str(content)))
        text = self._tok.apply_chat_template(pairs, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return repr(self._tok)


class Model:
    """A loaded model; build it with :func:`load`.

    The model is shared safely between threads; long calls release the GIL.
    """

    def __init__(self, native: Any):
        self._m = native
        self._tokenizer: Optional[Tokenizer] = None

    # -- description -------------------------------------------------------------------
    @property
    def source(self) -> pathlib.Path:
        """The checkpoint directory (or ``preset:NAME``)."""
        return pathlib.Path(self._m.source)

    @property
    def device(self) -> str:
        return self._m.device

    @property
    def dtype(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return self._m.dtype

    @property
    def kind(self) -> str:
        """``text`` for a text model (on-device decoder or PT-MoE), ``vlm`` for a
        vision-language model."""
        return self._m.kind

    @property
    def architecture(self) -> str:
        """``decoder`` (the on-device two-segment decoder, SmolLM2 and the like), ``ptmoe``
        (the server model: ours, or a tamm ``AFMParallelTrackMoEConfig`` folder), ``vlm`` (an
        afm-vl checkpoint) or ``smolvlm`` (a HF SmolVLM checkpoint)."""
        return self._m.architecture

    @property
    def config(self) -> Dict[str, Any]:
        """The decoder's configuration (HF field names)."""
        return json.loads(self._m.config_json())

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (ValueError for a preset, which has none)."""
        if self._tokenizer is None:
            if not self._m.has_tokenizer:
                raise ValueError(f"{self._m.source} has no tokenizer.json")
            self._tokenizer = Tokenizer(self._m.source)
        return self._tokenizer

    # -- text ----------------------------------------------------------------------------
    def generate(
        self,
        prompt: Union[str, Sequence[Any]],
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
        return_details: bool = False,
    ) -> Union[str, Dict[str, Any]]:
        """Generate text, as ``afm-vl generate`` does with the same options.

        ``prompt``: a string (wrapped in the chat template as one user turn unless
        ``raw=True``) or a list of chat messages (dicts with role and content).
        Sampling: ``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1, ``min_p`` 0 and
        ``repetition_penalty`` 1 are off; ``seed`` makes sampling repeatable. ``stop``: one
        or more strings that end the text (cut before them). ``stream`` is called with each
        piece of text as soon as it is final. Returns the text, or with
        ``return_details=True`` a dict (text, tokens, stop_reason, prompt_tokens,
        generated_tokens, prefill_s, decode_s, prefill_tok_s, decode_tok_s).

        Ctrl-C (KeyboardInterrupt) stops a generation between two tokens.
        """
        if not isinstance(prompt, str):
            prompt = self.tokenizer.apply_chat_template(list(prompt), True)
            raw = True
        stops = _stops(stop)
        out = self._m.generate(
            prompt,
            raw,
            int(max_tokens),
            float(temperature),
            int(top_k),
            float(top_p),
            float(min_p),
            float(repetition_penalty),
            int(seed),
            stops,
            bool(ignore_eos),
            stream,
        )
        return out if return_details else out["text"]

    def logits(self, token_ids: Any) -> torch.Tensor:
        """fp32 logits ``[seq, vocab]`` at every position of ``token_ids`` (a list of ints, a
        1-D integer tensor or ``[1, seq]``), computed without gradients on the model's
        device. An int64 tensor is read in place (no copy)."""
        return self._m.logits(_ids_tensor(token_ids))

    # -- vision --------------------------------------------------------------------------
    def tile(self, image: Any, mode: str = "auto", **options: Any) -> Any:
        """The tiles this model's vision encoder sees: :func:`afm_vl.tile` with the
        checkpoint's tiler configuration (tile sizes, normalisation) for a vision-language
        model, the default one for a text model."""
        return tile(image, mode, _base=self._m.tiler_config_json(), **options)

    def encode_image(self, image: Any, mode: str = "auto") -> torch.Tensor:
        """Visual tokens ``[tiles × tokens_per_tile, hidden]`` (fp32, no autograd) of an
        image tiled in ``mode``: what ``describe`` splices into the prompt. Needs a
        vision-language model (ValueError for a text model)."""
        kind, payload, w, h = image_parts(image)
        return self._m.encode_image(kind, payload, w, h, mode)

    def describe(
        self,
        image: Any,
        mode: str = "auto",
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
        return_details: bool = False,
    ) -> Union[str, Dict[str, Any]]:
        """Describe an image as ``afm-vl describe`` does (``prompt`` None: the checkpoint's
        default instruction); sampling options as in :meth:`generate`. Returns the
        description, or with ``return_details=True`` a dict (text, mode, tiles,
        visual_tokens, prompt_tokens, tokens, generated_tokens, stop_reason, timings).
        Needs a vision-language model (ValueError for a text model)."""
        kind, payload, w, h = image_parts(image)
        out = self._m.describe(
            kind,
            payload,
            w,
            h,
            mode,
            prompt,
            int(max_tokens),
            float(temperature),
            int(top_k),
            float(top_p),
            float(min_p),
            float(repetition_penalty),
            int(seed),
            _stops(stop),
            stream,
        )
        return out if return_details else out["text"]

    # -- adapters ------------------------------------------------------------------------
    def load_adapter(self, path: PathLike, name: Optional[str] = None) -> str:
        """Load a LoRA adapter (PEFT layout: adapter_config.json +
        adapter_model.safetensors; on a tamm model also the adapter toolkit's checkpoint, a
        ``.pt`` of tamm adapter tensors) into the cache under ``name`` (default: the folder's
        name) without activating it. Returns the name."""
        return self._m.load_adapter(os.fspath(path), name)

    def use_adapter(self, name: Optional[str]) -> None:
        """Activate a loaded adapter (an overlay: no weight is copied), or none."""
        self._m.use_adapter(name)

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter and free its memory (deactivating it first)."""
        self._m.unload_adapter(name)

    @property
    def adapters(self) -> List[str]:
        """Names of the loaded adapters."""
        return self._m.adapters

    @property
    def active_adapter(self) -> Optional[str]:
        return self._m.active_adapter

    def __repr__(self) -> str:
        return repr(self._m)


from . import eval  # noqa: E402  (after the definitions it uses)
