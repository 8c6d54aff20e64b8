"""Released weights: a directory with ``model.safetensors`` + ``config.json`` (+ a ``README.md`` model card).

Every weights read and write of the package goes through here. Two modules, one per side of the seam:

- `hub.weightfiles`: a weights location (local path, or a Hugging Face Hub id already in the local cache)
  resolved, its safetensors file read (never unpickled) and its ``config.json`` read and checked;
- `hub.pretrained`: models saved to and rebuilt from such a folder, and partial encoder loads;

and `hub.modelcard`, the ``README.md`` model card `hub.pretrained` writes next to the weights.

Import from ``mtl_breast.hub``; the names below are the public API.
"""

from mtl_breast.hub.pretrained import (
    CARD_NAME,
    checkpoint_filter_fn,
    clean_state_dict,
    load_encoder_into,
    load_pretrained,
    save_pretrained,
)
from mtl_breast.hub.weightfiles import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    WeightsError,
    hf_cache_dir,
    read_safetensors,
    read_safetensors_shapes,
    resolve_weights,
    weights_and_config,
)

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "WeightsError",
    "checkpoint_filter_fn",
    "clean_state_dict",
    "hf_cache_dir",
    "load_encoder_into",
    "load_pretrained",
    "read_safetensors",
    "read_safetensors_shapes",
    "resolve_weights",
    "save_pretrained",
    "weights_and_config",
]
