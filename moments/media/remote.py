"""Read an object over HTTP(S) as a seekable file, with range requests (the probe of an upload
staged in an object store reads it through a presigned URL: no credentials in the probe child,
no local copy).

Reads go in aligned blocks of ``block_bytes``; the last ``blocks_kept`` blocks are kept, so the
demuxer's small back-and-forth reads cost one request per block, and memory stays at
``block_bytes * blocks_kept`` whatever the size of the object.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import httpx

BLOCK_BYTES = 4 * 1024 * 1024
BLOCKS_KEPT = 8
TIMEOUT_S = 30.0


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over ``url`` (which must answer range requests with 206)."""

    def __init__(self, url: str, *, block_bytes: int = BLOCK_BYTES, blocks_kept: int = BLOCKS_KEPT,
                 timeout_s: float = TIMEOUT_S) -> None:
        super().__init__()
        self.url = url
        self.block_bytes = block_bytes
        self.blocks_kept = blocks_kept
        self._client = httpx.Client(timeout=timeout_s, trust_env=False)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self.requests = 0
        first = self._fetch(0)
        self.size = self._size
        self._keep(0, first)

    # io.RawIOBase ---------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self.size:
            index, skip = divmod(self._pos, self.block_bytes)
            block = self._block(index)
            take = min(len(view) - done, len(block) - skip)
            if take <= 0:
                break
            view[done:done + take] = block[skip:skip + take]
            done += take
            self._pos += take
        return done

    def close(self) -> None:
        if not self.closed:
            self._client.close()
        super().close()

    # blocks ---------------------------------------------------------------------------------

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            block = self._fetch(index)
            self._keep(index, block)
        else:
            self._blocks.move_to_end(index)
        return block

    def _keep(self, index: int, block: bytes) -> None:
        self._blocks[index] = block
        while len(self._blocks) > self.blocks_kept:
            self._blocks.popitem(last=False)

    def _fetch(self, index: int) -> bytes:
        start = index * self.block_bytes
        end = start + self.block_bytes - 1
        self.requests += 1
        try:
            reply = self._client.get(self.url, headers={"Range": f"bytes={start}-{end}"})
        except httpx.HTTPError as exc:
            raise OSError(f"cannot read {_redacted(self.url)}: {exc}") from exc
        if reply.status_code == 416:  # past the end
            return b""
        if reply.status_code != 206:
            raise OSError(f"range read of {_redacted(self.url)} answered HTTP {reply.status_code}")
        total = reply.headers.get("content-range", "").rpartition("/")[2]
        if not total.isdigit():
            raise OSError(f"range read of {_redacted(self.url)} gave no total size")
        self._size = int(total)
        return reply.content


def _redacted(url: str) -> str:
    """The URL without its query (a presigned URL's signature stays out of messages and logs)."""
    return url.split("?", 1)[0]
