"""Writing files safely: the one atomic writer, the writable-folder check and the SHA-256 that the outputs share."""

import contextlib
import hashlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """
    Yield a temporary path next to `path` (same folder, same suffix, so writers that go by it still can); it is
    renamed to `path` when the block succeeds and deleted otherwise: `path` is never half-written.

    Example:

    ```python
    >>> with atomic_path("results.json") as temporary:
    ...     temporary.write_text("{}")
    ```"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def nearest_existing(path) -> Path:
    """`path` (absolute) or its nearest parent that exists: where a folder that does not exist yet would be made."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder, context):
    """Raise unless `folder` exists as a writable folder or can be created (its nearest existing parent is one)."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{context}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{context}: the folder {existing} is not writable")


def sha256_file(path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks (`hashlib.file_digest` needs Python 3.11)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_path", "check_writable_folder", "nearest_existing", "sha256_file"]
