"""Names of the compute dtypes every role agrees on."""

from __future__ import annotations

import torch

from afd.errors import ConfigError

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str, checkpoint_dtype: str) -> torch.dtype:
    """The torch dtype for a config value; "auto" follows the checkpoint's config.json."""
    chosen = checkpoint_dtype if name == "auto" else name
    if chosen not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype {chosen!r} is not supported; choose one of {sorted(COMPUTE_DTYPES)} or auto")
    return COMPUTE_DTYPES[chosen]
