"""A user's first command answers at once: `mtl-breast --help`, `mtl-breast COMMAND --help` (and `import mtl_breast`)
load neither torch nor Lightning; the public functions are still there on first use."""

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


COMMANDS = ["demo", "synth", "preprocess", "predict", "evaluate", "extract", "export", "convert", "corpus", "plot",
            "fit-check", "pretrain", "finetune"]


def test_every_command_is_in_the_startup_check():
    from mtl_breast.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_loads_no_deep_learning_library(argv):
    out = subprocess.run([sys.executable, "-c", HELP.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert "usage: mtl-breast" in out.stdout, out.stderr
    if argv[0] in ("pretrain", "finetune"):
        assert "{fit,validate,test}" in out.stdout and f"configs/{argv[0]}/demo.yaml" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout[-300:]


def test_public_functions_are_imported_on_first_use():
    import mtl_breast

    for name in ("create_model", "extract_features", "list_models", "load_pretrained", "save_pretrained"):
        assert name in dir(mtl_breast) and callable(getattr(mtl_breast, name))
    assert "mtl_vit_test" in mtl_breast.list_models()
    with pytest.raises(AttributeError, match="no attribute 'not_a_function'"):
        mtl_breast.not_a_function  # noqa: B018
