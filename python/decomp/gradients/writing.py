"""Writing outputs without losing anything: one policy for every file and folder decomp writes.

- An existing target is replaced only when it holds what this writer wrote (`ours`) and overwrite=True; anything
  else there is never touched, overwrite or not.
- A symbolic link is never written through, replaced or deleted: a target that is a link, or a folder that holds
  one, is refused naming it.
- What is written goes into a fresh hidden sibling (`.<name>.<host>-<pid>-<random>.partial`) and is renamed into
  place once complete, so the target holds either what was there before or the complete new output, never half of
  one. A folder replaced is first moved aside (`....old`) and deleted only once the new one is in place.
- A process killed mid-write leaves its hidden sibling behind; the next write to the same target removes it (only
  a sibling of exactly that name whose process, on this machine, is gone), and puts back a folder a kill left
  moved aside with nothing in its place.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .store import kill_point

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _sibling_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}-"


def _sibling_pattern(path: Path) -> re.Pattern:
    """Matches the hidden siblings decomp's writers make for `path`: (host, pid, partial|old)."""
    return re.compile(rf"\.{re.escape(path.name)}\.([A-Za-z0-9_]+)-(\d+)-[A-Za-z0-9_]+\.(partial|old)")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True    # exists, but another user's
    return True


def stale_siblings(path) -> list:
    """The hidden siblings of `path` that a writer on this machine left when it was killed (its process is gone)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern, stale = _sibling_pattern(path), []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and match.group(1) == _HOST and int(match.group(2)) != os.getpid() \
                and not _running(int(match.group(2))):
            stale.append(entry)
    return sorted(stale)


def tidy(path) -> None:
    """Removes what killed writers left beside `path`; a folder moved aside by a writer killed before it put the
    new one in place is put back when nothing took its place."""
    path = Path(path)
    for entry in stale_siblings(path):
        if entry.name.endswith(".old") and entry.is_dir() and not entry.is_symlink() \
                and not path.exists() and not path.is_symlink():
            os.rename(entry, path)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def refuse_links(path, argument: str = "path") -> None:
    """FileExistsError when `path` is a symbolic link or a folder holding one (at any depth)."""
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{argument}={str(path)!r} is a symbolic link (to {os.readlink(path)!r}); decomp never "
                              f"writes through or replaces a link: pass the path it points to, or another path")
    if path.is_dir():
        for folder, folders, files in os.walk(path):
            for name in sorted(folders + files):
                entry = Path(folder) / name
                if entry.is_symlink():
                    raise FileExistsError(
                        f"{argument}={str(path)!r} holds a symbolic link, {str(entry.relative_to(path))!r} -> "
                        f"{os.readlink(entry)!r}; decomp never writes through or deletes links: choose another path")


def check_target(path, *, overwrite: bool, ours: Callable[[Path], bool], what: str, writer: str,
                 argument: str = "path", folder: bool = False) -> Path:
    """The target as a Path, or a FileExistsError naming the argument and the path when `writer` may not write it:
    a link (or a folder holding one), a file where a folder goes or a folder where a file goes, anything that does
    not hold `what` (`ours(path)` is False) and, without overwrite, anything at all (an empty folder excepted)."""
    path = Path(path)
    tidy(path)
    refuse_links(path, argument)
    if not path.exists():
        return path
    if path.is_dir() != folder:
        raise FileExistsError(f"{argument}={str(path)!r} exists and is not a {'folder' if folder else 'file'}; "
                              f"{writer} never replaces what decomp did not write: choose another path")
    if folder and not any(path.iterdir()):
        return path
    if not ours(path):
        raise FileExistsError(f"{argument}={str(path)!r} exists and is not {what}: {writer} never replaces what "
                              f"decomp did not write; choose another path")
    if not overwrite:
        raise FileExistsError(f"{argument}={str(path)!r} already holds {what}: pass overwrite=True to replace it")
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _failed(error: Exception, what: str, path: Path) -> OSError:
    message = (f"could not write {what} to {path}: {error}; nothing was written there (what it would replace is "
               f"intact)")
    code = getattr(error, "errno", None)
    return OSError(code, message) if code is not None else OSError(message)


def write_file(path, write: Callable[[Path], None], *, what: str, kill: Optional[str] = None,
               wrap: type = OSError) -> Path:
    """Calls write(partial) to fill a fresh hidden sibling of `path`, flushes it to disk and renames it to `path`
    (replacing what is there in one step). A failure removes the sibling and leaves `path` as it was; an error of
    type `wrap` (a full disk, a failed write) is raised again as an OSError naming `what` and the path, saying that
    nothing was written. `kill`: the fault-injection point just before the rename."""
    path = Path(path)
    handle, partial = tempfile.mkstemp(prefix=_sibling_prefix(path), suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        write(Path(partial))
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        if kill:
            kill_point(kill)
        refuse_links(path)
        os.replace(partial, path)
    except Exception as error:
        Path(partial).unlink(missing_ok=True)
        if isinstance(error, wrap) and not isinstance(error, FileExistsError):
            raise _failed(error, what, path) from error
        raise
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def write_text(path, text: str, *, what: str = "a file") -> Path:
    """`text` into the file `path`, atomically (see write_file); a link there is refused, never written through."""
    path = Path(path)
    refuse_links(path)
    if path.is_dir():
        raise IsADirectoryError(f"path={str(path)!r} is a folder; expected a file to write {what} into")
    return write_file(path, lambda partial: partial.write_text(text), what=what)


def write_folder(path, fill: Callable[[Path], None], *, recheck: Optional[Callable[[Path], object]] = None,
                 kill: Optional[str] = None) -> Path:
    """Calls fill(partial) to fill a fresh hidden sibling folder of `path`, then moves it into place: an empty
    folder there is removed first; anything else there (recheck(path) is called first and must allow it) is moved
    aside, and deleted once the new folder is in place (put back if the rename fails). A failure removes the
    sibling and leaves `path` as it was. `kill`: the fault-injection prefix (`<kill>` once filled, `<kill>-swap`
    once the old folder is moved aside)."""
    path = Path(path)
    partial = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path), suffix=".partial", dir=path.parent))
    try:
        fill(partial)
        if kill:
            kill_point(kill)
        if recheck is not None:
            recheck(path)
        _install(partial, path, kill)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _fsync_folder(path.parent)
    return path


def _install(partial: Path, path: Path, kill: Optional[str]) -> None:
    refuse_links(path)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.rename(partial, path)
        return
    old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(path), suffix=".old", dir=path.parent))
    old.rmdir()
    os.rename(path, old)
    try:
        if kill:
            kill_point(f"{kill}-swap")
        os.rename(partial, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
