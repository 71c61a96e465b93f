"""Writing run folders atomically: everything goes to a hidden sibling folder that is renamed into place."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from corsa.errors import InputError

MANIFEST = "edit_manifest.json"


def check_writable(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done, so a mistyped --out never costs a training run."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it", field="--out")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder", field="--out")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out` in one rename, on any error it is removed."""
    out = check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def now() -> str:
    """The UTC time to the second, as every record and manifest stamps it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temp file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=_json_default)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_report(out: Path, table: str, draw: Callable[[Path], None]) -> None:
    """A bench run's table.md and plot.png, both made from its results.json files, and the table printed."""
    write_text(out / "table.md", table + "\n")
    draw(out / "plot.png")
    print(f"\n{table}\n\nwrote {out / 'table.md'} and {out / 'plot.png'}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("corsa", "torch", "transformers", "peft", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    out["cpu"] = cpu_name()
    return out


def cpu_name() -> str:
    """The CPU and the vector instructions torch uses on it: the machine behind a timing changes from day to day
    here (AVX-512 with native bf16 on some days, AVX2 without it on others), and that decides speed and bf16."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise InputError(f"{run_dir} has no {MANIFEST}; is it a corsa run folder?", field="--adapter")
    return json.loads(path.read_text())


