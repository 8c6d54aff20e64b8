"""Writing matplotlib figures to PNG files that a reader never sees half-written."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtl_breast.files import atomic_path


def save_png(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Render `fig` to a temporary PNG in the target folder, then rename it to `path` (folder created).

    A failed or interrupted render leaves the previous file or none, and no temporary file.
    """
    path = Path(path)
    FigureCanvasAgg(fig)  # render with Agg whatever made the figure (a bare Figure() has no canvas of its own)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
