"""A ring block -> its batch: the C encoder (fanoutd/_fastpath.c) where it was built,
else decode.py's rows encoded by wire.py, which are the reference it is tested against
byte for byte (tests/test_fastpath.py)."""

from __future__ import annotations

from collections.abc import Callable

from fanoutd import wire
from fanoutd.decode import LEN, MAX_TUNNEL_DEPTH, decode_block

# (block, first frame offset, frames, payload bytes, errors, prefix, seq[, tunnel depth])
#   -> (batch body, rows, wire bytes)
EncodeFunction = Callable[..., tuple[bytes, int, int]]


def check_tunnel_depth(tunnel_depth: int) -> None:
    """ValueError unless 0 <= tunnel_depth <= decode.MAX_TUNNEL_DEPTH, as the C encoder."""
    if not 0 <= tunnel_depth <= MAX_TUNNEL_DEPTH:
        raise ValueError(f"tunnel_depth {tunnel_depth} is not in 0..{MAX_TUNNEL_DEPTH}")


def encode_rows_py(block: bytes, first_offset: int, num_pkts: int, payload_bytes: int,
                   errors: dict, prefix: bytes, seq: int,
                   tunnel_depth: int = 1) -> tuple[bytes, int, int]:
    """Version 1: decode.py, then wire.rows_body."""
    check_tunnel_depth(tunnel_depth)
    rows = decode_block(block, first_offset, num_pkts, errors, payload_bytes, tunnel_depth)
    return wire.rows_body(prefix, seq, rows), len(rows), sum(row[LEN] for row in rows)


def encode_columns_py(block: bytes, first_offset: int, num_pkts: int, payload_bytes: int,
                      errors: dict, prefix: bytes, seq: int,
                      tunnel_depth: int = 1) -> tuple[bytes, int, int]:
    """Version 2: decode.py, then wire.columns_body."""
    check_tunnel_depth(tunnel_depth)
    rows = decode_block(block, first_offset, num_pkts, errors, payload_bytes, tunnel_depth)
    body = wire.columns_body(prefix, seq, rows, payload_bytes)
    return body, len(rows), sum(row[LEN] for row in rows)


try:
    from fanoutd import _fastpath
except ImportError:  # not built (no compiler at install time): the Python reference
    _fastpath = None

IMPLEMENTATION = "C" if _fastpath is not None else "Python"
# The C encoder reads the ring in place; the Python one gets a copy of each block, since
# its rows keep slices of it after the block has gone back to the kernel.
READS_IN_PLACE = _fastpath is not None
ENCODERS: dict[int, EncodeFunction] = {
    wire.ROWS_VERSION: _fastpath.encode_batch if _fastpath else encode_rows_py,
    wire.COLUMNS_VERSION: _fastpath.encode_columns if _fastpath else encode_columns_py,
}


class BlockEncoder:
    """One worker's batches, in one wire-format version."""

    def __init__(self, version: int, iface: str, worker: int, epoch: int,
                 payload_bytes: int, sensor: str = "", tunnel_depth: int = 1) -> None:
        check_tunnel_depth(tunnel_depth)
        self.version = version
        self.payload_bytes = payload_bytes
        self.tunnel_depth = tunnel_depth
        fields = tuple(f.name for f in wire.fields_for(payload_bytes))
        self.prefix = wire.batch_prefix(version, iface, worker, epoch, fields, sensor=sensor)
        self._encode = ENCODERS[version]
        self._encode_into = (_fastpath.encode_columns_into
                             if _fastpath and version == wire.COLUMNS_VERSION else None)

    def encode(self, block: bytes, first_offset: int, num_pkts: int, errors: dict,
               seq: int) -> tuple[bytes, int, int]:
        """(batch body, rows, wire bytes); errors (reason -> count) grows as decoding
        finds them."""
        return self._encode(block, first_offset, num_pkts, self.payload_bytes, errors,
                            self.prefix, seq, self.tunnel_depth)

    def encode_into(self, buffer: memoryview, block: bytes, first_offset: int,
                    num_pkts: int, errors: dict, seq: int) -> tuple[int, int, int]:
        """encode(), with the batch written at the start of buffer (an outbox slot):
        (its length, rows, wire bytes). The C encoder of version 2 writes it there
        directly; ValueError when it does not fit."""
        if self._encode_into is not None:
            return self._encode_into(buffer, 0, block, first_offset, num_pkts,
                                     self.payload_bytes, errors, self.prefix, seq,
                                     self.tunnel_depth)
        body, rows, wire_bytes = self.encode(block, first_offset, num_pkts, errors, seq)
        if len(body) > len(buffer):
            raise ValueError(f"a batch of {len(body)} bytes outgrows its buffer of "
                             f"{len(buffer)}")
        buffer[:len(body)] = body
        return len(body), rows, wire_bytes
