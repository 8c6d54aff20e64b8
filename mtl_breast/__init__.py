"""mtl-breast: foundation models for breast DCE-MRI."""

__version__ = "0.1.0"

from mtl_breast.features import extract_features
from mtl_breast.hub import load_pretrained, save_pretrained
from mtl_breast.models.registry import create_model, list_models

__all__ = ["__version__", "create_model", "extract_features", "list_models", "load_pretrained", "save_pretrained"]
