import os
from typing import Any, Dict, Optional, Sequence, Union

PathLike = Union[str, os.PathLike[str]]

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
) -> Dict[str, Any]: ...
