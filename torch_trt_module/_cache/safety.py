"""The engine cache's directory is ours, and private: who may write it, which files are ours, and
opening them without following links or blocking.

- :func:`directory_problem`: why a cache directory is not safe to read entries from (others can
  write it), checked as ssh checks ``~/.ssh``: the directory (and its subdirectories) must be the
  user's and writable by no one else; a parent up to the home directory (or ``/``) must not be
  world-writable without the sticky bit, since whoever can write a parent can swap the directory.
  With ``$TORCH_TRT_MODULE_CACHE_KEY`` set, every entry is authenticated, so a directory shared
  with a group, or owned by a teammate, is accepted; a world-writable one never is.
- :func:`ours`: whether a file name is one the cache's layout writes (``clear``/``prune`` remove
  nothing else).
- :func:`read_regular`, :func:`open_regular`: open with ``O_NOFOLLOW | O_NONBLOCK`` and read only
  regular files, so that a symlink cannot point an entry elsewhere and a FIFO cannot hang a read.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import IO

__all__ = ["NOT_A_DIRECTORY", "SUBDIRS", "NotRegular", "directory_problem", "open_regular", "ours", "read_regular"]

SUBDIRS = ("entries", "index", "aux", "locks")
#: The end of :func:`directory_problem`'s answer for a cache path that is a file.
NOT_A_DIRECTORY = ". Fix: point cache_dir= (or $TORCH_TRT_MODULE_CACHE) at a directory, or remove the file"
_NAME = r"[0-9A-Za-z_.-]{1,100}"
_OURS = {
    "entries": re.compile(rf"(?:{_NAME}\.json|{_NAME}\+{_NAME}\+[0-9a-f]{{16}}\.blob)"),
    "index": re.compile(rf"{_NAME}\.json"),
    "aux": re.compile(rf"{_NAME}\.bin"),
    "locks": re.compile(rf"{_NAME}\.lock"),
}
# atomic_write's temp files: "." + the final name + "." + mkstemp's random characters + ".tmp"
_TMP = re.compile(r"\.(?P<name>[^/]+)\.[A-Za-z0-9_]{1,32}\.tmp")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class NotRegular(OSError):
    """A cache file that is a symlink, a FIFO, a directory or a device: never read."""


def ours(sub: str, name: str) -> bool:
    """Whether ``name`` in the cache's ``sub`` folder is a name the cache's layout writes."""
    pattern = _OURS.get(sub)
    if pattern is None:
        return False
    if (m := _TMP.fullmatch(name)) is not None:
        name = m.group("name")
    return pattern.fullmatch(name) is not None and not name.startswith(".")


def _open(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise NotRegular(f"{os.fspath(path)} is a symbolic link; cache files are never followed") from None
        raise e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(f"{os.fspath(path)} is not a regular file (mode {stat.filemode(st.st_mode)})")
    return fd, st


def read_regular(path: str | os.PathLike[str]) -> tuple[os.stat_result, bytes]:
    """(stat, bytes) of a regular file, opened without following a symlink and without blocking;
    :class:`NotRegular` for anything else, FileNotFoundError if absent."""
    fd, st = _open(path)
    with os.fdopen(fd, "rb") as f:
        return st, f.read()


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """A regular file opened for reading, as :func:`read_regular` opens it."""
    fd, _ = _open(path)
    return os.fdopen(fd, "rb")


def _writable_by_others(st: os.stat_result, *, shared_ok: bool) -> str | None:
    uid = os.geteuid()
    if st.st_mode & stat.S_IWOTH:
        return f"anyone can write it (mode {stat.filemode(st.st_mode)})"
    if not shared_ok and st.st_mode & stat.S_IWGRP:
        return f"its group can write it (mode {stat.filemode(st.st_mode)})"
    if not shared_ok and st.st_uid != uid:
        return f"it belongs to another user (uid {st.st_uid}, you are {uid})"
    return None


def directory_problem(root: Path, *, shared_ok: bool = False) -> str | None:
    """Why entries must not be read from ``root`` (others can write it or a parent of it), or None.

    ``shared_ok`` (a signing key is set): a group-writable directory, or another user's, is
    accepted. A directory that does not exist yet is fine if its nearest existing parent is."""
    if not hasattr(os, "geteuid"):  # Windows: no POSIX modes to check
        return None
    path = Path(os.path.realpath(root))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    for d in (path, *path.parents):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue  # made later, by the cache, with mode 0o700
        except OSError as e:
            return f"{d} cannot be checked ({e})"
        if d == path and not stat.S_ISDIR(st.st_mode):
            return f"{d} is not a directory{NOT_A_DIRECTORY}"
        if d == path:
            for sub in ("", *SUBDIRS):
                with contextlib.suppress(FileNotFoundError):
                    why = _writable_by_others(os.stat(d / sub) if sub else st, shared_ok=shared_ok)
                    if why:
                        fix = f"chmod 700 {d}" + (f" {d / sub}" if sub else "")
                        return f"{d / sub if sub else d}: {why}. Fix: {fix}" + (
                            ", and chown it to yourself" if "another user" in why else "")
        elif st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            # Whoever can write a parent can rename the cache directory and put another in its place.
            return (f"its parent {d} is writable by anyone, without the sticky bit (mode "
                    f"{stat.filemode(st.st_mode)}). Fix: chmod o-w {d}, or put the cache elsewhere")
        if d == home:
            break
    return None
