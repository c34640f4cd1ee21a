"""Reading a committed checkpoint's files for loading, checksummed on the way in (no separate pass).

Two ways, both straight from the store (local, NFS or s3://), nothing staged on local disk:
* `read_verified`: a whole file into memory (one buffer of the file's size), hashed as it streams in
  and compared with the marker's whole-file checksum. What a rank loads on the world size that wrote
  the checkpoint: its own shard(s) and the small shared files.
* `RangedReader`: a seekable, read-only file object over ranged reads (pyarrow's read_at). What the
  re-partitioning loader reads through: torch.load(map_location="meta") reads only a zip's directory
  and pickle, and the parameter slices a rank needs are read by range afterwards. A part of a file
  cannot be checked against the whole file's checksum, so markers written since per-chunk checksums
  exist record one XXH3-64 per CHUNK_BYTES of every file; the reader fetches whole chunks, checks
  each one, and keeps the last CACHE_CHUNKS of them (a bounded buffer: CACHE_CHUNKS x CHUNK_BYTES per
  open file). Older markers (whole-file checksum only) are read by range with their sizes checked.
"""
from __future__ import annotations

import io
from collections import OrderedDict

import xxhash

CHECKSUM = "xxh3_64"
CHUNK_BYTES = 1 << 20    # bytes per recorded chunk checksum (new markers record it with each file)
CACHE_CHUNKS = 8         # verified chunks a RangedReader keeps (sequential slices reuse them)
STREAM_PIECE = 8 << 20   # bytes per read when a whole file is read


class ChecksumMismatch(OSError):
    """A file's bytes differ from what its COMMITTED marker recorded (the message names the file)."""


class ChunkHasher:
    """A whole-file hash and one hash per CHUNK_BYTES, fed in any pieces (the writer's side)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes, self.whole, self.chunk = chunk_bytes, xxhash.xxh3_64(), xxhash.xxh3_64()
        self.in_chunk, self.chunks, self.size = 0, [], 0

    def update(self, view: memoryview) -> None:
        self.whole.update(view)
        self.size += len(view)
        while len(view):
            take = min(len(view), self.chunk_bytes - self.in_chunk)
            self.chunk.update(view[:take])
            self.in_chunk += take
            view = view[take:]
            if self.in_chunk == self.chunk_bytes:
                self.chunks.append(self.chunk.hexdigest())
                self.chunk, self.in_chunk = xxhash.xxh3_64(), 0

    def record(self) -> dict:
        chunks = self.chunks + ([self.chunk.hexdigest()] if self.in_chunk else [])
        return {"size": self.size, "checksum": self.whole.hexdigest(), "algorithm": CHECKSUM,
                "chunk_bytes": self.chunk_bytes, "chunks": chunks}


def _checksummed(record) -> bool:
    return isinstance(record, dict) and record.get("algorithm") == CHECKSUM


def _size(record) -> int:
    return int(record["size"]) if isinstance(record, dict) else int(record)


class _SeekableRead(io.RawIOBase):
    """A read-only, seekable file of `size` bytes at position `pos`: subclasses say how to read."""

    size = 0
    pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos


class MemoryFile(_SeekableRead):
    """A seekable read-only file over a bytearray, without the copy io.BytesIO makes of one."""

    def __init__(self, data: bytearray):
        super().__init__()
        self.view, self.pos, self.size = memoryview(data), 0, len(data)

    def readinto(self, target) -> int:
        piece = self.view[self.pos:self.pos + len(target)]
        target[:len(piece)] = piece
        self.pos += len(piece)
        return len(piece)


def read_verified(fs, path: str, rel: str, record) -> bytearray:
    """The whole file, hashed while it is read and checked against its marker record (size always,
    checksum when recorded). Raises ChecksumMismatch naming `rel`."""
    expected = _size(record)
    buffer = bytearray(expected)
    hasher, filled = xxhash.xxh3_64(), 0
    with fs.open_input_stream(path) as f:
        while filled < expected:
            piece = f.read(min(STREAM_PIECE, expected - filled))
            if not piece:
                break
            buffer[filled:filled + len(piece)] = piece
            hasher.update(piece)
            filled += len(piece)
        extra = f.read(1)
    if filled != expected or extra:
        raise ChecksumMismatch(f"{rel} is truncated or altered (marker says {expected} bytes)")
    if _checksummed(record) and hasher.hexdigest() != record["checksum"]:
        raise ChecksumMismatch(f"{rel} was altered in place: its {CHECKSUM} checksum is {hasher.hexdigest()}, "
                               f"the COMMITTED marker recorded {record['checksum']} (same size)")
    return buffer


class RangedReader(_SeekableRead):
    """A seekable binary file over a pyarrow RandomAccessFile: each read is a ranged read; counts the
    bytes it fetched (`fetched`). With per-chunk checksums in `record`, reads whole chunks and checks
    each; raises ChecksumMismatch naming `rel`."""

    def __init__(self, raw, rel: str, record=None):
        super().__init__()
        self.raw, self.rel, self.record = raw, rel, record
        self.size = raw.size() if record is None else _size(record)
        if record is not None and raw.size() != self.size:
            raise ChecksumMismatch(f"{rel} is truncated or altered ({raw.size()} bytes, marker says {self.size})")
        self.chunk_bytes = int(record["chunk_bytes"]) if isinstance(record, dict) and record.get("chunks") else 0
        self.pos, self.fetched = 0, 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    # -- io.RawIOBase: readable/seekable/tell/seek from _SeekableRead ---------------------------
    def readinto(self, target) -> int:
        data = self.pread(self.pos, len(target))
        target[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._cache.clear()
        self.raw.close()
        super().close()

    # -- ranged reads --------------------------------------------------------------------------
    def pread(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) (fewer at the end of the file)."""
        end = min(self.size, start + length)
        if start >= end:
            return b""
        if not self.chunk_bytes:
            data = self.raw.read_at(end - start, start)
            self.fetched += len(data)
            return data
        first, last = start // self.chunk_bytes, (end - 1) // self.chunk_bytes
        pieces = [self._chunk(index) for index in range(first, last + 1)]
        joined = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        offset = start - first * self.chunk_bytes
        return joined[offset:offset + end - start]

    def _chunk(self, index: int) -> bytes:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        start = index * self.chunk_bytes
        data = self.raw.read_at(min(self.chunk_bytes, self.size - start), start)
        self.fetched += len(data)
        actual = xxhash.xxh3_64_hexdigest(data)
        expected = self.record["chunks"][index]
        if actual != expected:
            raise ChecksumMismatch(f"{self.rel} was altered in place: its bytes [{start}, {start + len(data)}) have "
                                   f"{CHECKSUM} checksum {actual}, the COMMITTED marker recorded {expected}")
        self._cache[index] = data
        if len(self._cache) > CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return data
