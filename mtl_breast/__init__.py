"""mtl-breast: foundation models for breast DCE-MRI."""

__version__ = "0.1.0"
