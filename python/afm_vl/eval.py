"""``afm_vl.eval.run``: ``afm-vl eval FOLDER...`` from Python."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional, Sequence, Union

from . import _native

__all__ = ["run"]

PathLike = Union[str, "os.PathLike[str]"]


def _list(v: Union[None, str, Sequence[str]]) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [s for s in v.split(",") if s.strip()]
    return [str(s) for s in v]


def run(
    folders: Union[PathLike, Sequence[PathLike]],
    model: Optional[PathLike] = None,
    *,
    out: Optional[PathLike] = None,
    device: str = "auto",
    dtype: str = "fp32",
    tasks: Union[None, str, Sequence[str]] = None,
    subjects: Union[None, str, Sequence[str]] = None,
    languages: Union[None, str, Sequence[str]] = None,
    limit: Optional[int] = None,
    shots: Union[None, int, str] = None,
    chat: bool = False,
    max_new_tokens: int = 256,
    split: str = "test",
    dev_dir: Optional[PathLike] = None,
    batch_size: int = 8,
    reuse_prefix: bool = True,
    resume: bool = False,
    shard: Optional[str] = None,
    skip_bad: bool = False,
    progress: bool = False,
    _backend: str = "model",
) -> Dict[str, Any]:
    """Evaluate a model on MMLU / MMMLU / MGSM / JSONL benchmark folders, exactly as
    ``afm-vl eval`` does with the same options, and return the content of its
    ``results.json`` as a dict (model, config, tasks with micro/macro accuracy, items, ...).

    ``model``: a checkpoint directory (default: the default text model). ``out``: the
    folder for journal.jsonl, run.json, results.json and results.md (default: a temporary
    folder, removed afterwards). ``tasks``/``subjects``/``languages``: lists or
    comma-separated strings. ``shots``: N or ``"task=N,task=N"``. The other options are the
    CLI's flags (``reuse_prefix=False`` is ``--no-prefix-reuse``).
    """
    from . import _resolve

    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    model_dir = os.fspath(_resolve(model))
    common = dict(
        device=device,
        dtype=dtype,
        tasks=_list(tasks),
        subjects=_list(subjects),
        languages=_list(languages),
        limit=limit,
        shots=str(shots) if shots is not None else None,
        chat=chat,
        max_new_tokens=max_new_tokens,
        split=split,
        dev_dir=os.fspath(dev_dir) if dev_dir is not None else None,
        batch_size=batch_size,
        reuse_prefix=reuse_prefix,
        resume=resume,
        shard=shard,
        skip_bad=skip_bad,
        progress=progress,
        backend=_backend,
    )
    folders = [os.fspath(f) for f in folders]
    if out is None:
        with tempfile.TemporaryDirectory(prefix="afm_vl-eval-") as tmp:
            text = _native.eval_run(folders, model_dir, os.path.join(tmp, "out"), **common)
    else:
        text = _native.eval_run(folders, model_dir, os.fspath(out), **common)
    return json.loads(text)
