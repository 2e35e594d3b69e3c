"""Read the records of a wandb run file (RUN/wandb/offline-run-*/run-ID.wandb), which wandb >= 0.19 writes from
its Go core and no longer reads from Python.

The layout, as wandb's own reader had it (wandb/sdk/internal/datastore.py in github.com/wandb/wandb up to 0.18):
a 7-byte header (b":W&B", uint16 0xBEE1, uint8 version 0), then LevelDB's log format
(github.com/google/leveldb doc/log_format.md): 32 KiB blocks of records `uint32 checksum, uint16 length,
uint8 type, data`, little-endian; type FULL=1 holds a whole record, FIRST=2, MIDDLE=3, LAST=4 a record split
over blocks; a block tail shorter than a record header is zero padding. The checksum is zlib's crc32 of the
data, seeded with the crc32 of the type byte. Each record's data is a wandb_internal_pb2.Record.
"""

import struct
import zlib
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """Every record's bytes, in order; a damaged file fails on the first bad checksum."""
    raw = path.read_bytes()
    assert raw[:HEADER] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path}: not a wandb run file"
    found, pending, index = [], b"", HEADER
    while index < len(raw):
        if BLOCK - index % BLOCK < HEADER:  # zero padding at a block's end
            index += BLOCK - index % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", raw[index:index + HEADER])
        data = raw[index + HEADER:index + HEADER + length]
        if len(data) < length:  # a record still being written
            break
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {index}"
        index += HEADER + length
        if kind == FULL:
            found.append(data)
        elif kind in (FIRST, MIDDLE):
            pending += data
        elif kind == LAST:
            found.append(pending + data)
            pending = b""
        else:  # kind 0: a zeroed tail with no records after it
            break
    return found
