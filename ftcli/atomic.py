"""Writing files and folders under a temporary name and renaming them, so a killed run never leaves a
half-written file behind, and a power loss never leaves a renamed but empty one.

Durability, the POSIX way: the data of a file (every file of a folder) is fsync'ed before the rename, the folder
itself too, and the parent folder after the rename, so the new name and what it points at reach the disk together.
A write that fails for want of space, a file-size limit or permission is a `WriteFailed` naming the path and
the cause; the temporary file or folder is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import tempfile
from pathlib import Path

from ftcli.errors import RunError

TMP_SUFFIX = ".tmp"


class WriteFailed(RunError, OSError):
    """A file could not be written (disk full, file-size limit, permission, read-only file system). An OSError
    too, so code that tolerates a failed optional write (a cache) still does."""

    def __init__(self, path: Path, cause: str):
        self.path, self.cause = Path(path), cause
        super().__init__(f"could not write {path}: {cause}")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name (a folder's entries: the names in it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first, `root` last."""
    folders = []
    for here, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(here) / name)
        folders.append(Path(here))
    for f in reversed(folders):
        fsync_path(f)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    with file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _mkparent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteFailed(path.parent, e.strerror or str(e)) from None


@contextlib.contextmanager
def file(path: Path):
    """Yield a temporary path beside `path` for a writer that takes a file name; on success it is fsync'ed and
    replaces `path`, and the folder is fsync'ed."""
    path = Path(path)
    _mkparent(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            fsync_path(Path(tmp))
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def folder(path: Path):
    """Yield a temporary sibling folder; on success it is fsync'ed (every file, then the folders) and replaces
    `path` (an existing `path` is moved aside first and removed after), and the parent is fsync'ed."""
    path = Path(path)
    _mkparent(path)
    with writing(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        with writing(path):
            yield tmp
            fsync_tree(tmp)
            if path.exists():
                old = old_name(path)
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                fsync_path(path.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
                fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def old_name(path: Path) -> Path:
    """Where `path` waits while its replacement is moved in (`remove_leftovers` puts it back after a kill)."""
    return path.with_name(f".{path.name}.old")


def is_temporary(name: str) -> bool:
    """Is `name` one of the temporary names `file` and `folder` write under ('.NAME.XXXXXXXX.tmp')?"""
    return re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX), name) is not None


def remove_leftovers(root: Path) -> list[Path]:
    """After a kill: remove the temporary files and folders `file` and `folder` left in `root` (not below), and
    put back a folder that was moved aside for a replacement that never arrived. Returns what was removed."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") and p.name.endswith(".old"):
            original = p.with_name(p.name[1:-len(".old")])
            if not original.exists():
                p.rename(original)  # killed between the two renames of a replacement: the old one stands
                continue
        elif not is_temporary(p.name):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p)
    if removed:
        fsync_path(root)
    return removed


# ------------------------------------------------------------------------------------------------------------
# why a write failed


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write of `path` into `WriteFailed` when the cause is the disk (space, size limit,
    permission); anything else (a bug in the writer) passes through unchanged."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:
        cause = write_failure(path, e)
        if cause is None:
            raise
        raise WriteFailed(path, cause) from e


def write_failure(path: Path, exc: BaseException) -> str | None:
    """Why writing under `path` failed, in words, or None when it does not look like the disk's doing.

    Python's own writes raise OSError with an errno; safetensors says "(os error N)"; torch.save only says
    "unexpected pos" or "file write failed", so the disk is examined: free space, the process's file-size limit
    (ulimit -f), write permission."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in DISK_ERRNOS:
        return _explain(code, path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return _explain(errno.ENOSPC, path)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return _explain(errno.EFBIG, path)
    if not os.access(folder, os.W_OK):
        return _explain(errno.EACCES, path)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return None


def _explain(code: int, path: Path) -> str:
    words = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{words} (the disk is full)"
    if code == errno.EFBIG:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = "" if soft == resource.RLIM_INFINITY else f": the file-size limit (ulimit -f) is {soft:,} bytes"
        return f"{words}{limit}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{words} (no permission to write there)"
    return words
