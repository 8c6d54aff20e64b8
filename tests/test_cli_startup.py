"""A user's first command answers at once: `mtl-breast --help` (and `import mtl_breast`) load neither torch nor
Lightning; the public functions are still there on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

HELP = """
import sys
from mtl_breast.cli import main
sys.argv = ["mtl-breast", *{argv!r}]
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "lightning", "monai", "timm") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["fit-check", "--help"], ["predict", "--help"]])
def test_help_loads_no_deep_learning_library(argv):
    out = subprocess.run([sys.executable, "-c", HELP.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert "usage: mtl-breast" in out.stdout, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-300:]


def test_public_functions_are_imported_on_first_use():
    import mtl_breast

    for name in ("create_model", "extract_features", "list_models", "load_pretrained", "save_pretrained"):
        assert name in dir(mtl_breast) and callable(getattr(mtl_breast, name))
    assert "mtl_vit_test" in mtl_breast.list_models()
    with pytest.raises(AttributeError, match="no attribute 'not_a_function'"):
        mtl_breast.not_a_function  # noqa: B018
