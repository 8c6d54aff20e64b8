"""mtl-breast: foundation models for breast DCE-MRI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public functions need torch: each is imported on first use, so `import mtl_breast` (and with it every
# `mtl-breast` command's parser and `--help`) does not load torch.
_EXPORTS = {
    "create_model": "mtl_breast.models.registry",
    "extract_features": "mtl_breast.features",
    "list_models": "mtl_breast.models.registry",
    "load_pretrained": "mtl_breast.hub",
    "save_pretrained": "mtl_breast.hub",
}

__all__ = ["__version__", "create_model", "extract_features", "list_models", "load_pretrained", "save_pretrained"]

if TYPE_CHECKING:
    from mtl_breast.features import extract_features
    from mtl_breast.hub import load_pretrained, save_pretrained
    from mtl_breast.models.registry import create_model, list_models


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next lookup is an ordinary attribute
        return value
    raise AttributeError(f"module 'mtl_breast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
