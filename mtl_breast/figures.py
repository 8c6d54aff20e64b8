"""Writing matplotlib figures to PNG files that a reader never sees half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_png(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Render `fig` to a temporary PNG in the target folder, then rename it to `path` (folder created).

    A failed or interrupted render leaves the previous file or none, and no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # render with Agg whatever made the figure (a bare Figure() has no canvas of its own)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; figures are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
