"""Writing output files: whole or not at all, to the resolved target, never over an input.

Every file puregmm writes (a model, a checkpoint, the CLI's scores, samples, report and
picture) goes through :func:`atomic_open`:

* **Resolved.** A symbolic link is followed, so the link stays a link and its target gets the
  new contents; the temporary file lives in the target's folder so that the final rename is
  atomic (a rename across file systems is not).
* **Regular files only.** An existing target must be a regular file: a folder, a device node
  (``/dev/full``), a FIFO or a socket is refused before anything is written.
* **Atomic.** Data goes to a temporary file, is flushed and fsynced, then renamed over the
  target with :func:`os.replace`; a crash or a kill at any moment leaves the old file (and at
  worst a stray ``.<name>.*.tmp`` beside it), an error removes the temporary file.

:func:`check_distinct` refuses an output that is the same file as an input (or as another
output), comparing device and inode where both exist and resolved paths otherwise.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Union

PathLike = Union[str, "os.PathLike[str]"]

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def resolve_output(path: PathLike) -> Path:
    """The file that writing ``path`` will create or replace: symlinks resolved, checked.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: the "folder" is a file.
        IsADirectoryError: ``path`` is a folder.
        ValueError: ``path`` is a device, FIFO or socket, or a symlink loop.
    """
    shown = os.fspath(path)
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new path; its folder is checked below
        mode = None
    except OSError as err:  # ELOOP, ENAMETOOLONG, ...
        raise ValueError(f"cannot write {shown!r}: {err.strerror}; pass another output path") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(f"output {shown!r} is a folder; pass a file name (a new one inside it, for example)")
    if mode is not None and not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ValueError(f"output {shown!r} is {kind}; puregmm writes regular files only (pass a file name)")
    folder = target.parent
    if not folder.exists():
        raise FileNotFoundError(f"folder {str(folder)!r} for {shown!r} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {shown!r}: {str(folder)!r} is a file, not a folder")
    return target


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose contents replace ``path`` when the block ends without an error.

    The data lands in a temporary file in the resolved target's folder; on success it is
    flushed, fsynced and renamed over the target (and the folder fsynced), on any exception
    (``KeyboardInterrupt`` included) it is removed and the target is untouched.

    Raises:
        the errors of :func:`resolve_output`; PermissionError naming ``path`` when the folder
        is not writable.
    """
    target = resolve_output(path)
    mode = _file_mode(target)
    try:  # the name is cut so that a long target name still leaves room for the random part
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:100]}.", suffix=".tmp", dir=target.parent)
    except PermissionError:
        raise PermissionError(
            f"cannot write {os.fspath(path)!r}: no permission to create files in {str(target.parent)!r}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600; give the file the mode a plain open() would
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def check_distinct(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike]) -> None:
    """Refuse an output that is the same file as an input or as another output.

    ``outputs`` and ``inputs`` map a name for messages (``"--out"``, ``"DATA"``) to a path.

    Raises:
        ValueError: naming both arguments and the path.
    """
    seen = list(inputs.items())
    for name, path in outputs.items():
        for other, known in seen:
            if _same_file(path, known):
                raise ValueError(
                    f"{name} {os.fspath(path)!r} is the same file as {other} {os.fspath(known)!r}; "
                    "writing it would destroy that file: choose another output path"
                )
        seen.append((name, path))


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks included
    except OSError:  # one does not exist (yet): compare where they resolve to
        return os.path.realpath(a) == os.path.realpath(b)


def _file_mode(target: Path) -> int:
    """The target's current permission bits, or 0o666 less the umask for a new file."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)  # read the umask (os has no getter) and put it back
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
