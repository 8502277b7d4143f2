"""Where files live: local paths and object-store URIs behind one pyarrow filesystem interface."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from .errors import InputError


def filesystem_and_path(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI (s3://, gs://, file://)."""
    location = os.fspath(location)
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise InputError(f"cannot open {location!r}: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def is_local(location: str | os.PathLike) -> bool:
    location = os.fspath(location)
    return "://" not in location or location.startswith("file://")


def absolute_location(location: str | os.PathLike) -> str:
    """A local path made absolute (against the current folder); a URI as it is. For locations that
    are written down and read back from elsewhere (model.json's training data)."""
    location = os.fspath(location)
    return location if "://" in location else str(Path(location).absolute())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve_files(
    location: str | os.PathLike, extensions: tuple[str, ...]
) -> tuple[pafs.FileSystem, list[str]]:
    """The files a user meant by a file, a directory (searched recursively) or a glob, sorted.

    Files and folders whose name starts with ``_`` or ``.`` are skipped in directories, as Arrow's
    dataset discovery does, so quarantine and manifest folders are never read as input. A glob is
    matched with :mod:`fnmatch` below the folder before its first wildcard, where ``*`` also matches
    ``/``: ``dir/*.parquet`` takes the Parquet files of ``dir`` and of its subfolders.
    """
    location = os.fspath(location)
    wildcard = next((i for i, ch in enumerate(location) if ch in "*?["), None)
    base = location if wildcard is None else location[: location.rfind("/", 0, wildcard) + 1] or "."
    fs, base_path = filesystem_and_path(base)
    # The folder before the first wildcard is listed; the rest of the pattern is matched with fnmatch.
    pattern = None if wildcard is None else join(base_path, location[len(base) :])
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {location!r} does not exist")
    if info.type == pafs.FileType.File and pattern is None:
        return fs, [base_path]
    selector = pafs.FileSelector(base_path, recursive=True)
    files = []
    for entry in fs.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(base_path) :].lstrip("/")
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        if pattern is not None and not fnmatch.fnmatch(entry.path, pattern):
            continue
        if extensions and not entry.path.lower().endswith(extensions):
            continue
        files.append(entry.path)
    if not files:
        kind = f"{'/'.join(extensions)} " if extensions else ""
        raise InputError(f"no {kind}files found at {location!r}")
    return fs, sorted(files)


@contextlib.contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator:
    """An output stream whose file appears at ``path`` complete, or not at all.

    The file is written beside the target under a hidden name (skipped by dataset discovery) and
    moved into place when complete: a rename on local disks; on object stores, which cannot
    rename, a server-side copy, which publishes the whole object at once. If the block raises, the
    partial file is removed and the target is left as it was.
    """
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs.create_dir(folder, recursive=True)  # a no-op on object stores, needed on other file systems
    try:
        with fs.open_output_stream(tmp) as stream:
            yield stream
        fs.copy_file(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with atomic_output(fs, path) as out:
        out.write(data)


def write_folder_atomic(location: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Replace the folder at ``location`` with exactly ``files`` (relative path -> content).

    On a local disk the folder is staged beside the target and renamed into place, so a reader sees
    the old folder or the new one, never a mix. Object stores cannot rename: there each file is
    written atomically in the order given, so the caller lists its commit file (the one readers
    trust, e.g. model.json) last, and files of an older version that ``files`` lacks are removed
    after it. Callers check that the location holds their own kind of folder before replacing it.
    """
    fs, root = filesystem_and_path(location)
    root = root.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local_folder(root, files)
        return
    for name, data in files.items():
        write_bytes_atomic(fs, join(root, name), data)
    wanted = {join(root, name) for name in files}
    with contextlib.suppress(FileNotFoundError):
        for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if entry.type == pafs.FileType.File and entry.path not in wanted:
                fs.delete_file(entry.path)


def _write_local_folder(root: str, files: dict[str, bytes]) -> None:
    parent, name = os.path.split(root)
    os.makedirs(parent or ".", exist_ok=True)
    staging = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        for relative, data in files.items():
            path = os.path.join(staging, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if os.path.exists(root):
            # Replacing a folder: move the old one aside first; a reader in the microseconds between
            # the renames finds nothing and fails cleanly rather than mixing two versions.
            retired = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(root, retired)
            os.rename(staging, root)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, root)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(fs: pafs.FileSystem, path: str, obj) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str):
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def files_under(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Every file below ``folder`` (recursively), sorted; none when the folder does not exist."""
    if not exists(fs, folder):
        return []
    try:
        info = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    except FileNotFoundError:  # removed between the two calls
        return []
    return sorted(i.path for i in info if i.type == pafs.FileType.File)


def check_writable_folder(location: str | os.PathLike, what: str) -> None:
    """Fail before any work when ``location`` cannot become a folder this process writes (``what``
    names it in the message): it is a file, or on a local disk the folder, or the nearest existing
    folder it would be created in, is not writable. Object stores show permissions at the first
    write only; there just the URI is checked."""
    fs, path = filesystem_and_path(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise InputError(f"{what} {os.fspath(location)!r} is a file, not a folder")
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {os.fspath(location)!r} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {os.fspath(location)!r}: {existing} is not writable by this user")
