"""S3 for the transfer jobs: clients from :class:`~jobbridge.tasks.credentials.S3Access`, and object
uploads that run their parts in parallel and become visible only when committed.

Why not s3fs for writing: its files upload one part after another while the writer waits, which made
uploads to S3 less than half as fast as rclone's; and an object must not appear before the whole dataset
has arrived and matched its checksum. Here a writer hands each filled part to a shared thread pool (the
copy loop keeps reading and hashing meanwhile) and nothing is visible until :meth:`ObjectUpload.commit`:
a multipart upload is completed, or a small object (one part or less) is put, only then.

Part sizes start at 16 MiB and double every 1000 parts, so a stream of unknown length fits S3's 10,000
parts up to its 5 TB object limit, while memory stays bounded: at most ``2 x concurrency`` parts are in
flight per sink.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from jobbridge.tasks.credentials import S3Access

#: First part size; S3 needs at least 5 MiB for every part but the last.
PART_SIZE = 16 << 20
#: Parts per doubling of the part size (16 MiB x 1000, then 32 MiB x 1000, ...: 5 TB in < 10,000 parts).
PARTS_PER_STEP = 1000
#: Parallel requests per sink (parts, small objects, completions).
CONCURRENCY = 8


def s3_client(access: S3Access, concurrency: int = CONCURRENCY) -> Any:
    """A boto3 S3 client (thread-safe) with enough connections for ``concurrency`` requests."""
    import boto3
    from botocore.config import Config

    options = access.fsspec_options()
    config = Config(
        max_pool_connections=concurrency * 2 + 2,
        retries={"max_attempts": 10, "mode": "adaptive"},
        s3={"addressing_style": "path"} if access.endpoint_url else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=access.endpoint_url,
        region_name=access.region,
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
        aws_session_token=options.get("token"),
        config=config,
    )


def s3_filesystem(access: S3Access) -> Any:
    """An ``s3fs`` filesystem for reading (imported here: s3fs costs a second to import)."""
    import s3fs

    return s3fs.S3FileSystem(**access.fsspec_options())


def part_size(number: int) -> int:
    """Size of part ``number`` (1-based)."""
    return PART_SIZE << ((number - 1) // PARTS_PER_STEP)


def list_keys(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    """Every key under ``prefix`` (give it with its trailing ``/``)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    """Delete ``keys`` (1000 per request, S3's limit)."""
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


class UploadPool:
    """A thread pool shared by one sink's uploads, with a bound on requests in flight (memory)."""

    def __init__(self, client: Any, bucket: str, concurrency: int = CONCURRENCY) -> None:
        self.client = client
        self.bucket = bucket
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-upload")
        self._slots = threading.BoundedSemaphore(concurrency * 2)

    def submit(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``call`` on the pool; blocks while ``2 x concurrency`` requests are in flight."""
        self._slots.acquire()
        try:
            future = self._executor.submit(call, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        """Wait for running requests and stop the threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class ObjectUpload:
    """One object being written: parts go up in the background, the object appears at :meth:`commit`."""

    def __init__(self, pool: UploadPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.upload_id: str | None = None
        self.small: bytes | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._parts: list[Future[dict[str, Any]]] = []

    def write(self, data: bytes) -> int:
        """Buffer ``data``; every full part is sent at once, in the background."""
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        while self._buffered >= part_size(len(self._parts) + 1):
            self._send(part_size(len(self._parts) + 1))
        return len(data)

    def _take(self, size: int) -> bytes:
        joined = b"".join(self._chunks)
        self._chunks = [joined[size:]] if len(joined) > size else []
        self._buffered = len(joined) - min(size, len(joined))
        return joined[:size]

    def _send(self, size: int) -> None:
        for done in self._parts:  # fail fast: a part that failed for good stops the copy now
            if done.done() and done.exception() is not None:
                raise done.exception()  # type: ignore[misc]
        if self.upload_id is None:
            created = self.pool.client.create_multipart_upload(Bucket=self.pool.bucket, Key=self.key)
            self.upload_id = created["UploadId"]
        number = len(self._parts) + 1
        self._parts.append(self.pool.submit(self._upload_part, number, self._take(size)))

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        answer = self.pool.client.upload_part(
            Bucket=self.pool.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def finish(self) -> None:
        """The data is complete: send the last part and wait for every part (or keep a small object)."""
        if self.upload_id is None:
            self.small = self._take(self._buffered)
            return
        if self._buffered:
            self._send(self._buffered)
        for future in self._parts:
            future.result()

    @property
    def held_bytes(self) -> int:
        """Bytes of a small object held in memory until commit."""
        return len(self.small) if self.small is not None else 0

    def commit(self) -> None:
        """Make the object visible: complete the multipart upload, or put the small object."""
        client, bucket = self.pool.client, self.pool.bucket
        if self.upload_id is None:
            client.put_object(Bucket=bucket, Key=self.key, Body=self.small or b"")
            self.small = None
            return
        parts = sorted((future.result() for future in self._parts), key=lambda part: part["PartNumber"])
        client.complete_multipart_upload(
            Bucket=bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
        )

    def abort(self) -> None:
        """Drop the object: cancel queued parts, abort the multipart upload (S3 frees its parts)."""
        for future in self._parts:
            future.cancel()
        wait(self._parts)
        self.small = None
        if self.upload_id is not None:
            self.pool.client.abort_multipart_upload(
                Bucket=self.pool.bucket, Key=self.key, UploadId=self.upload_id
            )
            self.upload_id = None
