"""Small file helpers: the cache root, atomic writes, early checks that a path is writable."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import KnapSpecError


def cache_dir() -> Path:
    """Return knapspec's cache root (not created here).

    ``$KNAPSPEC_CACHE_DIR`` if set and non-empty, else ``$XDG_CACHE_HOME/knapspec``, else
    ``~/.cache/knapspec``.
    """
    explicit = os.environ.get("KNAPSPEC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "knapspec"
    return Path.home() / ".cache" / "knapspec"


def check_writable(path: str | os.PathLike) -> Path:
    """Raise ``KnapSpecError`` now if ``path`` cannot be written (before any long work)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise KnapSpecError(f"output path is a directory: {p}")
    if not parent.is_dir():
        raise KnapSpecError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise KnapSpecError(f"output directory is not writable: {parent}")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is created exclusively with mode 0o666 (the umask decides the final
    permissions, as for a plain ``open``) and fsynced before the rename.  Nothing is left at
    ``path`` (or beside it) if ``write`` raises; an existing file stays untouched.
    """
    p = check_writable(path)
    for _ in range(100):
        tmp = p.parent / f".{p.name}.{secrets.token_hex(6)}{suffix}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
    else:  # pragma: no cover
        raise KnapSpecError(f"{p}: could not create a temporary file")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _write)
