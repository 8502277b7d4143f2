"""Conditional writes: create a file only if none is there, replace or delete it only if it is unchanged.

What a lock needs and pyarrow's file systems do not offer. Each operation is one atomic step of the
store, so that of many concurrent callers exactly one succeeds:

* local disks (any ``pyarrow.fs.LocalFileSystem`` path, network mounts included): create is
  ``link(2)`` of a complete temporary file (fails when the name exists, and the file never appears
  half-written); replace and delete compare the content under ``flock(2)`` on the folder;
* ``s3://``: ``PutObject`` with ``If-None-Match: *`` (create) or ``If-Match: <ETag>`` (replace),
  ``DeleteObject`` with ``If-Match``, through s3fs's client;
* ``gs://``: uploads and deletes with ``ifGenerationMatch`` (``0`` to create), through gcsfs.

A *version* is what a later replace or delete must match: the content's sha256 locally, the ETag on
S3, the generation on GCS. The object-store clients are built from the pyarrow file system's own
settings (endpoint, region, credentials), so the conditional requests go where the data goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Protocol

import pyarrow.fs as pafs

from .errors import ConfigError

# Object-store answers that mean "the condition did not hold": the precondition failed, or another
# conditional write to the same key was in flight (S3's 409 ConditionalRequestConflict).
_CONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class ConditionalStore(Protocol):
    def read(self, path: str) -> tuple[bytes, str] | None:
        """The file's content and version; None when there is no file."""

    def create(self, path: str, data: bytes) -> str | None:
        """Write a new file; its version, or None when a file is already there."""

    def replace(self, path: str, data: bytes, version: str) -> str | None:
        """Overwrite the file if it still has ``version``; the new version, or None."""

    def delete(self, path: str, version: str) -> bool:
        """Remove the file if it still has ``version``."""


def conditional_store(fs: pafs.FileSystem) -> ConditionalStore:
    """The conditional operations of the store behind ``fs``."""
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalStore()
    if isinstance(fs, pafs.S3FileSystem):
        return S3Store(_s3fs(fs.__reduce__()[1][0]))  # the constructor arguments pickling keeps
    if isinstance(fs, pafs.GcsFileSystem):
        return GcsStore(_gcsfs(fs.__reduce__()[1][0]))
    if isinstance(fs, pafs.SubTreeFileSystem):
        return SubTreeStore(conditional_store(fs.base_fs), fs.base_path)
    raise ConfigError(
        f"{fs.type_name} storage has no atomic create-if-absent that speclabel knows: datasets that "
        "jobs write must be on a local or network disk, s3:// or gs://"
    )


class LocalStore:
    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, _sha256(data)

    def create(self, path: str, data: bytes) -> str | None:
        tmp = self._complete_temporary(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails when the name exists (unlike rename)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return _sha256(data)

    def replace(self, path: str, data: bytes, version: str) -> str | None:
        with self._folder_locked(path):
            current = self.read(path)
            if current is None or current[1] != version:
                return None
            os.replace(self._complete_temporary(path, data), path)
        return _sha256(data)

    def delete(self, path: str, version: str) -> bool:
        with self._folder_locked(path):
            current = self.read(path)
            if current is None or current[1] != version:
                return False
            os.unlink(path)
        return True

    @staticmethod
    def _complete_temporary(path: str, data: bytes) -> str:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    @staticmethod
    @contextlib.contextmanager
    def _folder_locked(path: str) -> Iterator[None]:
        """Compare-and-swap needs mutual exclusion: flock on the folder, held for milliseconds."""
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


class SubTreeStore:
    """Paths relative to a folder of another store (``pyarrow.fs.SubTreeFileSystem``)."""

    def __init__(self, store: ConditionalStore, base: str) -> None:
        self.store, self.base = store, base.rstrip("/") + "/"

    def read(self, path: str) -> tuple[bytes, str] | None:
        return self.store.read(self.base + path.lstrip("/"))

    def create(self, path: str, data: bytes) -> str | None:
        return self.store.create(self.base + path.lstrip("/"), data)

    def replace(self, path: str, data: bytes, version: str) -> str | None:
        return self.store.replace(self.base + path.lstrip("/"), data, version)

    def delete(self, path: str, version: str) -> bool:
        return self.store.delete(self.base + path.lstrip("/"), version)


class S3Store:
    def __init__(self, fs) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str] | None:
        # The ETag first, the content second: the content is then at least as new as the version, so a
        # replace judged on it but made against an older version fails instead of losing a newer write.
        try:
            version = self.fs.info(path, refresh=True)["ETag"]
            return self.fs.cat_file(path), version
        except FileNotFoundError:
            return None

    def create(self, path: str, data: bytes) -> str | None:
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, version: str) -> str | None:
        return self._put(path, data, IfMatch=version)

    def delete(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or _object_store_code(exc) in _CONDITION_FAILED:
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True

    def _put(self, path: str, data: bytes, **condition: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, FileNotFoundError):  # If-None-Match failed; If-Match on a deleted key
            return None
        except OSError as exc:
            if _object_store_code(exc) in _CONDITION_FAILED:
                return None
            raise
        finally:
            self.fs.invalidate_cache(path)
        return out["ETag"]


class GcsStore:
    """The JSON API through gcsfs's authenticated ``call`` (its ``pipe_file`` cannot match a
    generation other than 0); gcsfs raises FileExistsError for every 412 Precondition Failed."""

    def __init__(self, fs) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        except FileNotFoundError:
            return None
        return data, headers["x-goog-generation"]  # content and generation of one response

    def create(self, path: str, data: bytes) -> str | None:
        return self._upload(path, data, "0")

    def replace(self, path: str, data: bytes, version: str) -> str | None:
        return self._upload(path, data, version)

    def delete(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True

    def _upload(self, path: str, data: bytes, generation: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        upload = self.fs.base.replace("/storage/v1/", "/upload/storage/v1/") + "b/{}/o"
        try:
            out = self.fs.call(
                "POST",
                upload,
                bucket,
                uploadType="media",
                name=key,
                ifGenerationMatch=generation,
                data=data,
                headers={"Content-Type": "application/json"},
                json_out=True,
            )
        except FileExistsError:
            return None
        finally:
            self.fs.invalidate_cache(path)
        return str(out["generation"])


def _s3fs(options: dict):
    """An s3fs client with a pyarrow S3FileSystem's settings (fsspec keeps one per settings)."""
    try:
        import s3fs
    except ImportError as exc:  # a dependency of speclabel: only a broken install lacks it
        raise ConfigError(f"locking an s3:// dataset needs s3fs: {exc}") from exc
    kwargs: dict = {"anon": options["anonymous"], "use_listings_cache": False}
    if options.get("access_key"):
        kwargs.update(
            key=options["access_key"], secret=options["secret_key"], token=options.get("session_token")
        )
    endpoint = options.get("endpoint_override")
    if endpoint:
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{options['scheme']}://{endpoint}"
    if options.get("region"):
        kwargs["client_kwargs"] = {"region_name": options["region"]}
    return s3fs.S3FileSystem(**kwargs)


def _gcsfs(options: dict):
    """A gcsfs client with a pyarrow GcsFileSystem's settings (fsspec keeps one per settings)."""
    try:
        import gcsfs
    except ImportError as exc:
        raise ConfigError(
            f"writing a gs:// dataset needs gcsfs: pip install 'speclabel[gcs]' ({exc})"
        ) from exc
    kwargs: dict = {"use_listings_cache": False}
    if options.get("endpoint_override"):
        endpoint = options["endpoint_override"]
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{options['scheme']}://{endpoint}"
    if options.get("project_id"):
        kwargs["project"] = options["project_id"]
    if options.get("anonymous"):
        kwargs["token"] = "anon"
    elif options.get("access_token"):
        from google.oauth2.credentials import Credentials

        kwargs["token"] = Credentials(options["access_token"])
    return gcsfs.GCSFileSystem(**kwargs)


def _object_store_code(exc: BaseException) -> str | None:
    """The store's error code behind an fsspec exception (s3fs keeps the botocore error as cause)."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        exc = exc.__cause__
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
