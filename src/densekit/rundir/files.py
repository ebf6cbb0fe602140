"""Reading and writing a run directory's files: whole or not at all, and never more than a
file of its kind can hold.

Writes go to a temporary name in the same folder, are flushed, fsynced and renamed over
the old file (a run's own files) or linked into place only where nothing is (:func:`publish`:
exports, analyses, a new pruned run), so a kill at any moment leaves the previous version
whole and nothing a user had is replaced.

Reads treat every file as a stranger's: a FIFO, a device or a folder where a file belongs is
refused without being opened for reading (opening a FIFO blocks until someone writes), and
a file larger than its kind can be is refused before it is read.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..checks import ArgumentError, text
from ..errors import UserError
from ..results import json_text


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


# -- writing --------------------------------------------------------------------------------


def write(path: Path, data: bytes, replace: bool) -> None:
    """Put ``data`` at ``path`` so that readers see the old file or the new one, never a part.

    ``replace=False`` never replaces anything, not even a file that appears while the data are
    written: the finished temp file is hard-linked into place, which fails if a name is there."""
    # the temp name must fit where the name fits: a long name's temp keeps only its start
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_json(path: Path, obj: object) -> None:
    write(path, (json_text(obj, indent=2) + "\n").encode(), replace=True)


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:  # named by the target, not the temp file os.link reports
        raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
    except OSError:  # a filesystem without hard links: check, then rename (a tiny race)
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    Path(tmp).unlink()


def _sync_folder(folder: Path) -> None:
    # a rename lives in the folder: sync it too, or a power cut may undo it
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` only if nothing is there, never as a half file: not even a
    file that appeared since the caller last looked is replaced. Returns the path."""
    path = Path(path)
    try:
        write(path, data, replace=False)
    except FileExistsError:
        raise UserError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as e:  # a read-only folder, a full disk: the user's to fix
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from e
    return path


def publish_json(path: str | os.PathLike, obj: object) -> Path:
    return publish(path, (json_text(obj, indent=2) + "\n").encode())


def refuse_existing(path: str | os.PathLike) -> Path:
    """Fail early, before minutes of work, where :func:`publish` would fail at the end."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name")
    if path.exists() or path.is_symlink():
        raise UserError(f"{path}: already exists; refusing to overwrite it (remove it or choose another name)")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: folder does not exist (for {path.name})")
    return path


def refuse_nonempty(out: str | os.PathLike, argument: str = "out") -> Path:
    """Refuse a folder that holds anything (or a file where a folder should go); ``argument``
    names what gave the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"{{{argument}}} {text(out)}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ArgumentError(f"{{{argument}}} {text(out)}: directory is not empty; choose another "
                            "(densekit never overwrites files)")
    return out


# -- reading ------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path, max_bytes: int) -> int:
    """The size of the regular file at ``path`` (links followed); refuses anything else, or a
    file over ``max_bytes``, without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: is {_kind(st.st_mode)}, not a file; refusing to read it")
    if st.st_size > max_bytes:
        raise UserError(f"{path}: {st.st_size:,} bytes, more than such a file can hold ({max_bytes:,}); "
                        "refusing to read it")
    return st.st_size


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. Opened without blocking and
    checked again on the open file, so a FIFO swapped in after the first check is refused too."""
    check_regular(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise UserError(f"{path}: changed while being read; refusing it")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{path}: grew while being read; refusing it")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes, where: str) -> object:
    """JSON from ``text``; ``where`` starts the error (the file, and the line where it is one).
    NaN and Infinity, which Python's json reads but JSON has not (and densekit never writes),
    are refused too."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{where}: cannot read JSON: {e}") from e
    except RecursionError:
        raise UserError(f"{where}: cannot read JSON: nested too deeply") from None


def read_json(path: Path, max_bytes: int) -> dict:
    """A JSON object from a file of at most ``max_bytes``."""
    obj = loads(read_bytes(path, max_bytes), str(path))
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_lines(path: Path, max_bytes: int) -> list[str]:
    data = read_bytes(path, max_bytes)
    try:
        return data.decode().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: cannot read: {e}") from e


def read_tensors(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    check_regular(path, max_bytes)
    try:
        return safetensors.torch.load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path}: cannot read safetensors file: {' '.join(str(e).split())[:300]}") from e


def read_safetensors_metadata(path: Path, max_bytes: int, key: str) -> str | None:
    """One entry of a safetensors file's metadata, without reading its tensors."""
    check_regular(path, max_bytes)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get(key)
    except Exception as e:
        raise UserError(f"{path}: cannot read the resume state: {' '.join(str(e).split())[:300]}") from e


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors stores dense row-major data: channels-last weights are copied to that layout
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(plain, metadata=metadata)
