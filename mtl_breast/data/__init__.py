"""Data: readers for MAMA-MIA and unlabeled folders, synthetic phantoms, preprocessing, cache, loaders."""

from mtl_breast.data.case import Case, CaseError

__all__ = ["Case", "CaseError"]
