"""Request bodies to disk in fixed-size blocks, off the event loop, with bounded memory.

A request's bytes are copied into one preallocated block; each full block goes to a worker thread that
hashes and writes it (hashlib and ``pwrite`` release the GIL, so both cores work while the loop keeps
reading other requests). At most :data:`MAX_STREAMS` bodies stream at once (a request beyond that waits
for a slot, and TCP holds its bytes back), so memory stays below ``MAX_STREAMS * BLOCK_SIZE`` whatever
the file sizes and the number of clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.to_thread

from jobbridge.api.writers import BLOCK_SIZE, BlockSink

#: Request bodies streaming to disk at the same time.
MAX_STREAMS = 16
_limiter: anyio.CapacityLimiter | None = None


def stream_slots() -> anyio.CapacityLimiter:
    """The process-wide limit on bodies streaming at once (created inside the running event loop)."""
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(MAX_STREAMS)
    return _limiter


class BlockFeeder:
    """Collects pieces of a body into one block and hands each full block to ``sink`` in a thread."""

    def __init__(self, sink: BlockSink) -> None:
        self.sink = sink
        self.block = bytearray(BLOCK_SIZE)
        self.fill = 0
        self.total = 0

    async def feed(self, data: bytes | memoryview) -> None:
        """Take ``data``; full blocks are written before this returns."""
        view = memoryview(data)
        self.total += len(view)
        while view:
            take = min(len(view), BLOCK_SIZE - self.fill)
            self.block[self.fill : self.fill + take] = view[:take]
            self.fill += take
            view = view[take:]
            if self.fill == BLOCK_SIZE:
                await self.flush()

    async def flush(self) -> None:
        """Hand over what is buffered."""
        if self.fill:
            await anyio.to_thread.run_sync(self.sink.write_block, self.block, self.fill)
            self.fill = 0


async def pump(body: AsyncIterator[bytes], sink: BlockSink) -> int:
    """Stream a whole request body into ``sink``; returns its length."""
    feeder = BlockFeeder(sink)
    async for piece in body:
        if piece:
            await feeder.feed(piece)
    await feeder.flush()
    return feeder.total
