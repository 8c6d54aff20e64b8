"""Models: plain ``nn.Module``s importing only torch, timm and einops.

``layers`` (tokenizer, position embeddings, SDPA attention), ``temporal`` (phase encoding, attention across
phases), ``encoder`` (``ViTEncoder3d``), ``mae`` (``MAEPretrainer``), ``registry`` (``create_model``,
``list_models``), ``convert`` (MONAI ViT weights -> ``ViTEncoder3d``).
"""
