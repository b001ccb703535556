"""The cluster secret file: create it once (32 random bytes, mode 0600) and load it safely.

Every node and kai-admin must hold the same bytes; RPC authentication
(:mod:`kai.core.rpc.auth`) is keyed on them. This module must never write over an existing
secret, never create a file that another user could read even briefly, and never accept a
secret that is too short or readable by group or others.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from kai.core.errors import ConfigError

#: Length of a newly generated secret, in bytes.
SECRET_SIZE: Final = 32
#: Shortest secret accepted from an existing file, in bytes.
MIN_SECRET_SIZE: Final = 16
#: Longest secret accepted; anything larger is not a secret file.
MAX_SECRET_SIZE: Final = 4096


def load_secret(path: Path) -> bytes:
    """Read the cluster secret from ``path`` without ever creating it (used by kai-admin).

    Raises:
        ConfigError: the file is missing, unreadable, not a regular file, readable by group
            or others, or shorter than :data:`MIN_SECRET_SIZE` bytes. The message names the
            path and what to do.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"cluster secret file {path} does not exist; copy it from a node of the cluster"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot open cluster secret file {path}: {exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"cluster secret file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"cluster secret file {path} has mode {stat.S_IMODE(info.st_mode):04o}; it must"
                f" not be readable by group or others (run: chmod 600 {path})"
            )
        with os.fdopen(fd, "rb", closefd=False) as file:
            secret = file.read(MAX_SECRET_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read cluster secret file {path}: {exc}") from exc
    finally:
        os.close(fd)
    if len(secret) < MIN_SECRET_SIZE:
        raise ConfigError(
            f"cluster secret file {path} holds {len(secret)} bytes; at least {MIN_SECRET_SIZE}"
            " are required (delete it to have a new one generated, then copy it to every node)"
        )
    if len(secret) > MAX_SECRET_SIZE:
        raise ConfigError(f"cluster secret file {path} is larger than {MAX_SECRET_SIZE} bytes")
    return secret


def load_or_create_secret(path: Path) -> bytes:
    """Load the cluster secret, first creating ``path`` with a fresh one if it is missing.

    A new secret is :data:`SECRET_SIZE` bytes from :func:`os.urandom`, written to a
    temporary file created with ``O_CREAT | O_EXCL`` and mode 0600 in the same directory,
    synced, then hard-linked into place, so ``path`` never exists half-written and an
    existing secret (perhaps created concurrently by another process) is never replaced.
    Missing parent directories are created with mode 0700.

    Raises:
        ConfigError: as for :func:`load_secret`, or the file cannot be created.
    """
    if not path.exists():
        try:
            _create_secret(path)
        except OSError as exc:
            raise ConfigError(f"cannot create cluster secret file {path}: {exc}") from exc
    return load_secret(path)


def load_node_secret(path: Path, *, seeds: Sequence[str] = ()) -> bytes:
    """The cluster secret a starting node uses: loaded, or created by a node that founds a cluster.

    A node given ``seeds`` (other than itself) joins a cluster that already has a secret; one
    of its own would only make every member refuse it while it answers writes the cluster
    never sees, so a missing file is then an error saying what to copy where. The file's
    directory must exist: the node creates its data directory (the default place) first,
    and a ``secret_file`` in a directory that does not exist is a mistake to report, not a
    directory to create.

    Raises:
        ConfigError: as for :func:`load_or_create_secret`; or the directory is missing, or
            the file is missing and the node joins ``seeds``. One line naming the path.
    """
    directory = path.parent
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError(
            f"cluster secret file {path}: its directory {directory} {problem}; create it or"
            " set another secret_file (--secret-file)"
        )
    if seeds and not path.exists():
        raise ConfigError(
            f"cluster secret file {path} does not exist and this node joins the cluster of"
            f" {seeds[0]}: copy that cluster's secret file (cluster.secret in a member's data"
            f" directory) to {path}, chmod 600 it, and start again"
        )
    return load_or_create_secret(path)


def _create_secret(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # In case the umask removed owner bits.
            os.write(fd, os.urandom(SECRET_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # Another process won the race; its secret is the one to use.
    finally:
        temporary.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
