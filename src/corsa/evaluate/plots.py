"""The few plotting pieces the bench reports share: grouped bars in percent and an atomic PNG write."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def axes(width: float, height: float = 4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def grouped_bars(ax: Any, groups: Sequence[str], series: dict[str, list[float]], rotate: bool = False) -> None:
    """One bar per series inside each group; values in % on a 0-100 axis."""
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], list(groups),
                  rotation=20 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)


def save(fig: Any, path: Path) -> None:
    """Through a temporary file and a rename, as every output: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
