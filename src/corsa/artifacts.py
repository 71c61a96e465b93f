"""Writing run folders atomically: everything goes to a hidden sibling folder that is renamed into place.

The rule every writer here follows: corsa deletes or replaces only what it can prove it wrote. A temporary folder
carries a marker (PARTIAL) naming the process that made it, so a folder left by a killed run can be told from
anyone else's and cleaned by the next run; a finished run is known by its manifest, and `--overwrite` replaces
nothing else.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from corsa.errors import InputError

MANIFEST = "edit_manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what defines a PEFT adapter
PARTIAL = ".corsa-partial"  # inside a temporary folder while corsa writes it; removed just before the rename
# Room the temporary siblings add to a folder's name (".", ".tmp-", mkdtemp's 8 characters).
_TMP_EXTRA = len("..tmp-") + 8


def is_run(folder: Path) -> bool:
    """A folder `corsa edit` (or a store update) finished: it holds a readable corsa manifest."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format", "").startswith("corsa-edit/")
    except (OSError, ValueError, AttributeError):
        return False


def describe_run(folder: str | Path) -> str | None:
    """One phrase naming the corsa run in `folder` ("a corsa run of <time>: <method>, <n> edits"), else None."""
    folder = Path(folder)
    if not is_run(folder):
        return None
    m = json.loads((folder / MANIFEST).read_text())
    n = len(m.get("edits") or [])
    return f"a corsa run of {m.get('created', '?')}: {m.get('method', '?')}, {n} edit{'' if n == 1 else 's'}"


def check_writable(out: str | Path, overwrite: bool, *, owned: Callable[[Path], bool] = is_run,
                   field: str = "--out") -> Path:
    """Refuse an output before any work is done, so a mistyped --out never costs a training run and never loses
    anyone's files: an existing non-empty folder is replaced only with `overwrite` and only when `owned` proves
    corsa wrote it (default: it holds a corsa manifest); the folder must be creatable where it is named."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise InputError(f"{out} is a broken symbolic link", field=field)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder", field=field)
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(f"{out} already exists; pass --overwrite to replace it", field=field)
            if not owned(out):
                raise InputError(f"{out} exists and was not written by corsa (no {MANIFEST}); --overwrite replaces "
                                 "only corsa's own output, so choose another folder", field=field)
    if len(out.name.encode()) + _TMP_EXTRA > 255:
        raise InputError(f"the folder name {out.name[:40]}... is too long for the file system", field=field)
    # The nearest existing ancestor must be a folder we can create things in.
    parent = out.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise InputError(f"{parent} is a broken symbolic link", field=field)
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {out}: {parent} is a file, not a folder", field=field)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {out}: no permission to write in {parent}", field=field)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _mark(folder: Path, target: str) -> None:
    (folder / PARTIAL).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "target": target,
                                              "created": now()}))


def _orphaned(folder: Path) -> bool:
    """Whether `folder` is a temporary folder corsa made whose process is gone (on this machine)."""
    try:
        mark = json.loads((folder / PARTIAL).read_text())
        return mark["host"] == socket.gethostname() and not _alive(int(mark["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def clean_orphans(parent: str | Path, name: str = "*") -> list[Path]:
    """Remove what killed corsa processes left beside `parent/name`: temporary folders holding corsa's marker whose
    process is gone (and empty ones). An interrupted replacement (".old-" folder) is finished instead of deleted:
    the old run is removed only when the new one is in place, and restored otherwise. Returns what was removed."""
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    stem = "*" if name == "*" else glob.escape(name)
    for path in sorted(parent.glob(f".{stem}.tmp-*")):
        if not path.is_dir() or path.is_symlink():
            continue
        if not any(path.iterdir()):
            path.rmdir()
            removed.append(path)
        elif _orphaned(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in sorted(parent.glob(f".{stem}.old-*")):
        if not path.is_dir() or path.is_symlink() or not _orphaned(path):
            continue
        target = json.loads((path / PARTIAL).read_text())["target"]
        held = path / target
        if held.exists() and not (parent / target).exists():
            os.replace(held, parent / target)  # the replacement never landed: put the old run back
        elif held.exists():
            shutil.rmtree(held, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, *,
               owned: Callable[[Path], bool] = is_run) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out` in one rename, on any error it is removed. A folder a
    killed process left is removed by the next writer of the same `out` (clean_orphans)."""
    out = check_writable(out, overwrite, owned=owned)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _mark(tmp, out.name)
        yield tmp
        (tmp / PARTIAL).unlink()
        if out.exists() and any(out.iterdir()):
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            _mark(trash, out.name)
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)  # onto nothing, or onto an empty folder (rename allows that)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapter_sha256(folder: Path) -> str:
    """One checksum over the files that define the adapter (names included, so a swapped file is caught)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def now() -> str:
    """The UTC time to the second, as every record and manifest stamps it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def finished_row(results: Path, name: str) -> bool:
    """Whether a benchmark row's results file is already written, saying so: every bench resumes by skipping them."""
    if results.exists():
        print(f"{name}: done earlier, skipped")
        return True
    return False


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
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"not a valid manifest ({exc})", path=str(path)) from None
    if not isinstance(manifest, dict):
        raise InputError("not a valid manifest (not a JSON object)", path=str(path))
    return manifest


