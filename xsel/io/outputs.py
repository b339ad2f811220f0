"""Where commands write: one guard, one lock and one description of a failed write, shared by every command.

- :func:`check_output` runs before any work: an output may not be, contain or sit inside one of the command's
  inputs; its folder must exist or be creatable and be writable; a file output may not be a folder (nor the
  reverse); an existing output is replaced only with ``overwrite``, and only when xsel wrote it (a store with
  xsel's schema attribute, a CSV with xsel's header, a bundle holding only its manifest's files, a folder
  holding only the names xsel writes there).
- :func:`claim_output` adds the lock ``<out>.lock``, a POSIX record lock (``fcntl.lockf``): the kernel drops it
  when its process dies (kill -9 included) and forked worker processes do not inherit it. A second writer of
  the same output is refused in one line instead of mixing its results with the first one's.
- :func:`writing` turns a full disk, an exceeded quota or a refused write into one :class:`InputError` naming
  the file and, when known, the space it needed; the CLI's error boundary uses :func:`describe_os_error` for
  such errors raised anywhere else.
"""

from __future__ import annotations

import csv
import datetime as dt
import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from xsel.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock plays the same part
    fcntl = None
    import msvcrt

SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
FILE_KINDS = ("store", "csv", "html")
FOLDER_KINDS = ("bundle", "folder")

_held: dict[str, int] = {}  # lock files this process holds → nesting depth (a library call inside a command)


def safe_name(text: str, empty: str) -> str:
    """``text`` as a file or folder name on any system: runs of other characters than ASCII letters, digits, ``.``,
    ``_`` and ``-`` become ``_``; ``empty`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or empty


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_parent(out: Path, where: str, option: str) -> None:
    """The folder that will hold ``out`` exists or can be created, and can be written."""
    existing = _nearest_existing(_absolute(out).parent)
    if not existing.is_dir():
        raise InputError(f"{where}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"{where}: cannot write in {existing} (permission denied or read-only); choose another {option}"
        )


def _store_problem(out: Path) -> str | None:
    import h5py

    try:
        with h5py.File(out, "r") as handle:
            if "schema_version" in handle.attrs:
                return None
    except (OSError, ValueError):  # not HDF5 at all
        pass
    return "is not an xsel embedding store"


def _csv_problem(out: Path, header: tuple[str, ...]) -> str | None:
    with open(out, newline="", encoding="utf-8", errors="replace") as handle:
        columns = next(csv.reader([handle.readline()]), [])
    if tuple(column.strip() for column in columns[: len(header)]) == tuple(header):
        return None
    return f"is not a CSV written by xsel (its header does not start with {','.join(header)})"


def _html_problem(out: Path) -> str | None:
    with open(out, encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096)
    return None if '<meta name="generator" content="xsel">' in head else "is not a report written by xsel"


def _bundle_problem(out: Path) -> str | None:
    from xsel.bundle import MANIFEST

    try:
        files = json.loads((out / MANIFEST).read_text())["sha256"]
        names = {MANIFEST, *files}
    except (OSError, ValueError, KeyError, TypeError):
        return f"is not an xsel bundle (no readable {MANIFEST})"
    return _names_problem(out, names, "the bundle's")


def _names_problem(out: Path, names: Iterable[str], whose: str = "xsel's") -> str | None:
    allowed = set(names)
    extra = sorted(entry.name for entry in out.iterdir() if entry.name not in allowed)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"holds files that are not {whose} ({shown})"
    return None


def check_output(
    out: str | Path,
    *,
    kind: str,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    option: str = "--out",
    header: tuple[str, ...] = (),
    names: Iterable[str] | None = None,
) -> Path:
    """Refuse, before any work, an output the command must not write: a one-line :class:`InputError` naming ``option``.

    ``kind``: ``store`` (an HDF5 store), ``csv`` (a CSV whose first columns are ``header``), ``html`` (a report),
    ``bundle`` (an export
    folder) or ``folder`` (a folder xsel adds its files to; given ``names``, one it replaces as a whole and that
    may hold only those names). ``inputs``: what the command reads (None entries are skipped). ``overwrite``:
    an existing output may be replaced, when xsel wrote it.
    """
    if kind not in FILE_KINDS + FOLDER_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    where = f"{option} {out}"
    _check_parent(out, where, option)
    target = Path(os.path.realpath(out))
    for item in inputs:
        if item is None:
            continue
        source = Path(os.path.realpath(item))
        if target == source:
            raise InputError(f"{where} is an input of this command ({item}); write to a new {_noun(kind)}")
        if source.is_relative_to(target):
            raise InputError(f"{where} contains an input of this command ({item}); choose another {option}")
        if target.is_relative_to(source):
            raise InputError(f"{where} is inside an input of this command ({item}); choose another {option}")
    if not os.path.lexists(out):
        return out
    if kind in FILE_KINDS and out.is_dir():
        raise InputError(f"{where} is a folder; give the name of a file to write")
    if kind in FOLDER_KINDS and not out.is_dir():
        raise InputError(f"{where} is a file; give the name of a folder to write")
    if kind == "folder" and names is None:
        return out
    if not overwrite:
        raise InputError(f"{where} already exists; pass --overwrite to replace it")
    if kind == "store":
        problem = _store_problem(out)
    elif kind == "csv":
        problem = _csv_problem(out, header)
    elif kind == "html":
        problem = _html_problem(out)
    elif kind == "bundle":
        problem = _bundle_problem(out)
    else:
        problem = _names_problem(out, names)
    if problem:
        raise InputError(
            f"{where} {problem}; xsel replaces only what it wrote: move it away or choose another {option}"
        )
    return out


def _noun(kind: str) -> str:
    return "file" if kind in FILE_KINDS else "folder"


@contextmanager
def claim_output(out: str | Path, *, kind: str, option: str = "--out", **check) -> Iterator[Path]:
    """Lock ``out`` for this process, then :func:`check_output` it (so the check sees what no one else is changing).

    Folders created for it, and ``out`` itself when it is a folder the block left empty (a failed run), are
    removed again on the way out.
    """
    out = Path(out)
    _check_parent(out, f"{option} {out}", option)
    parent = _absolute(out).parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    existed = os.path.lexists(out)
    try:
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
        with output_lock(out, option=option):
            yield check_output(out, kind=kind, option=option, **check)
    finally:
        for folder in ([] if existed else [_absolute(out)]) + missing:
            with suppress(OSError):  # not empty (the run wrote there) or already gone: keep it
                folder.rmdir()


def lock_path(out: str | Path) -> Path:
    """The lock file of an output: ``<out>.lock`` next to it."""
    out = _absolute(Path(out))
    return out.with_name(out.name + ".lock")


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _holder(lock: Path) -> str:
    with suppress(OSError, ValueError):
        pid, started = lock.read_text().split(maxsplit=1)
        return f"PID {int(pid)}, started {started.strip()}"
    return "unknown process"


@contextmanager
def output_lock(out: str | Path, *, option: str = "--out") -> Iterator[None]:
    """Hold ``<out>.lock`` while the block runs; another process holding it is an :class:`InputError`.

    Re-entrant within a process (a command and the library call it makes may both claim the output).
    """
    lock = lock_path(out)
    key = str(lock)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise InputError(
                f"{option} {out} is being written by another xsel process ({_holder(lock)}); "
                f"wait for it to finish or choose another {option}"
            )
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file just as we locked it: lock the one now there
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {dt.datetime.now().isoformat(timespec='seconds')}\n".encode())
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with suppress(OSError):
            lock.unlink()  # while still locked: a process that opened the old file sees it gone and retries
        os.close(fd)


def _size(count: float) -> str:
    unit = "bytes"
    for larger in ("KB", "MB", "GB"):
        if count < 1024:
            break
        count, unit = count / 1024, larger
    return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"


def describe_os_error(error: OSError, path: str | Path | None = None, *, needed: int | None = None) -> str | None:
    """One line for a failure of the machine rather than of xsel — a full disk, an exceeded quota, a refused or
    read-only write — naming the file (``path``, the output being written, when the caller knows it) and the
    space it needed; None for any other error."""
    code = error.errno
    if code not in SPACE_ERRNOS | ACCESS_ERRNOS:
        return None
    name = path if path is not None else error.filename
    if code in SPACE_ERRNOS:
        reason = "disk quota exceeded" if code != errno.ENOSPC else "no space left on device"
        folder = _nearest_existing(_absolute(Path(name or ".")).parent)
        free = ""
        with suppress(OSError):
            free = f", {_size(shutil.disk_usage(folder).free)} free in {folder}"
        need = f" (it needs about {_size(needed)}{free})" if needed else f" ({free.lstrip(', ')})" if free else ""
        target = f" while writing {name}" if name else ""
        return f"{reason}{target}{need}; free some space and run the command again"
    reason = "read-only file system" if code == errno.EROFS else "permission denied"
    if path is not None:
        return f"cannot write {path} ({reason}); choose another output or fix the folder's permissions"
    return f"{name or 'a file'}: {reason}"


@contextmanager
def writing(path: str | Path, *, needed: int | None = None) -> Iterator[None]:
    """Turn an environment failure while writing ``path`` into a one-line :class:`InputError` (see
    :func:`describe_os_error`); the writer inside still removes its temporaries."""
    try:
        yield
    except OSError as error:
        message = describe_os_error(error, path, needed=needed)
        if message is None:
            raise
        raise InputError(message) from None
