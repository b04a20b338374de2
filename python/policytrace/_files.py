"""Files written by policytrace: one atomic, durable writer and content digests.

Every file the package writes goes through :func:`write_atomic`: the bytes go to a temporary
file in the same folder, are flushed to disk (``fsync``), and are renamed over the target, whose
folder is then synced too. A reader therefore sees the old file or the new one, never half of
one, even after SIGKILL or a power cut. New files get the permissions a plain ``open()`` would
give them (``0o666`` minus the user's umask).

Temporaries are named ``.<name>.<host>.<pid>.<random>.tmp`` so that a later process can tell a
leftover of a dead writer (same host, pid no longer alive) from the live temporary of another
process filling the same folder (another torchrun rank): :func:`remove_stale_temporaries`
deletes only the former. See docs/design.md ("Run folder").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from . import _faults

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file: what ``open(path, "w")`` would create."""
    return 0o666 & ~_umask()


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def temp_prefix(name: str) -> str:
    """Prefix of this process's temporaries for a file called ``name``."""
    return f".{name}.{_host()}.{os.getpid()}."


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
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


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        _faults.checkpoint("before-rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sampled_digest(path: str | os.PathLike, window: int = 1 << 20) -> str:
    """A fast identity of a possibly huge file (model weights): its size and the SHA-256 of its
    first, middle and last ``window`` bytes. Catches replaced, truncated or re-quantized files
    without reading gigabytes on every resume."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for start in sorted({0, max(0, size // 2 - window // 2), max(0, size - window)}):
            fh.seek(start)
            h.update(fh.read(window))
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) encoded in a temporary's name, or None when the name has no owner."""
    parts = name.split(".")
    # "", <name parts...>, host, pid, random + suffix: the pid is the third part from the end.
    if len(parts) < 5:
        return None
    try:
        return parts[-4], int(parts[-3])
    except ValueError:
        return None


def is_stale(name: str) -> bool:
    """A temporary left behind by a dead process of this host (or one with no owner recorded)."""
    owner = _owner(name)
    if owner is None:
        return True
    host, pid = owner
    return host == _host() and not _pid_alive(pid)


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = f".*{_TMP_SUFFIX}") -> list[Path]:
    """Delete leftovers of killed writers under ``folder`` (recursively); returns what went."""
    folder = Path(folder)
    gone: list[Path] = []
    if not folder.exists():
        return gone
    for p in sorted(folder.rglob(pattern)):
        if is_stale(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def make_temp_dir(parent: Path, name: str) -> Path:
    """A temporary folder beside ``parent/name`` with an owner-tagged name (for :func:`is_stale`)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name), suffix=_TMP_SUFFIX))
