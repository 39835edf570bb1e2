"""Google Cloud Storage through gcsfs: conditional writes by generation preconditions
(``ifGenerationMatch``), and a client that gives up at once on an unreachable endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import conflict
from .fsspec_backend import Conditional, ObjectStoreBackend
from .remote_errors import gcsfs_fails_fast

if TYPE_CHECKING:
    from .retry import RetryPolicy


class GCSConditional(Conditional):
    """Conditional requests on GCS (gcsfs, JSON API): ``ifGenerationMatch=0`` creates,
    ``ifGenerationMatch=GENERATION`` replaces and deletes; versions are generations."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)
        headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
        if not generation:  # emulators may not send it: ask for the object's metadata
            info = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
            generation = info["generation"]
            _, data = self.fs.call(
                "GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation
            )
        return bytes(data), str(generation)

    def _upload(self, path: str, data: bytes, generation: str) -> str:
        bucket, key, _ = self.fs.split_path(path)
        try:
            out = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="media",
                name=key,
                ifGenerationMatch=generation,
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                json_out=True,
            )
        finally:
            self.fs.invalidate_cache(path)
        return str(out["generation"])

    def create(self, path: str, data: bytes) -> str:
        return self._upload(path, data, "0")  # FileExistsError (412) if it exists

    def replace(self, path: str, data: bytes, version: str) -> str:
        try:
            return self._upload(path, data, version)
        except (FileExistsError, FileNotFoundError):  # gcsfs: 412 is FileExistsError
            raise conflict(path, "replacing") from None

    def remove(self, path: str, version: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            raise conflict(path, "removing") from None
        finally:
            self.fs.invalidate_cache(path)


class GCSBackend(ObjectStoreBackend):
    """GCS (gcsfs): files streamed through gcsfs (which retries each request), conditional
    requests by generation."""

    def __init__(self, fs: Any, retry: RetryPolicy, allow_symlinks: bool) -> None:
        super().__init__(fs, retry, allow_symlinks, GCSConditional(fs))
        gcsfs_fails_fast(fs)
