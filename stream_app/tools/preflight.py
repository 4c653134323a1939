"""Checks a command makes before its long work: its outputs can be written, its port is free.

Each raises UserError with one line the user can act on, so a mistake shows in a second instead
of as a traceback after a long replay. None of them leaves anything behind.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from pathlib import Path

from stream_app.errors import UserError
from stream_app.settings import Settings, env_name


def require_writable_file(path: Path, what: str) -> None:
    """``path`` can be written (created, or overwritten when it exists); ``what`` names it."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"{what} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is not a directory")
    try:
        _probe_file(path)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be written: {exc.strerror}") from None


def _probe_file(path: Path) -> None:
    """Open ``path`` for writing without changing it: an existing regular file is opened (not
    truncated), a missing one is created and removed again. Devices and pipes are left alone."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        path.unlink()
        return
    if stat.S_ISREG(mode):
        os.close(os.open(path, os.O_WRONLY))


def require_distinct(paths: dict[str, Path | None]) -> None:
    """No two of the named paths are the same file (one output would overwrite another, or the
    input). Paths are compared resolved; devices such as /dev/null may repeat."""
    seen: dict[Path, str] = {}
    for what, path in paths.items():
        if path is None or (path.exists() and not path.is_file()):
            continue
        key = path.resolve()
        if key in seen:
            raise UserError(f"{what} {path} is the same file as {seen[key]}")
        seen[key] = what


def require_writable_dir(path: Path, what: str) -> None:
    """``path`` is a folder we can write in, or one we can create (its nearest existing ancestor
    is a writable folder)."""
    existing = path.expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot write in {existing}: {exc.strerror}") from None


def require_free_port(host: str, port: int) -> None:
    """The worker's web server can listen on ``host:port`` (nothing else listens there)."""
    names = f"{env_name('web_host')} and {env_name('web_port')}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise UserError(
            f"web host {host!r} does not resolve ({exc.strerror}); check {names}"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        # As the web server does: a port in TIME_WAIT is free, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(
                    f"web port {port} on {host} is already in use (another worker?); stop it or "
                    f"choose another port with {env_name('web_port')}"
                ) from None
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}); check {names}"
            ) from None


def require_worker_can_start(settings: Settings) -> None:
    """What a worker needs before it connects: its web port, and a state folder it can write."""
    require_free_port(settings.web_host, settings.web_port)
    require_writable_dir(settings.state_dir, env_name("state_dir"))
