"""fanoutd.batch: a received batch read through records(), columns(), to_arrow() and
to_polars() gives the same values as decode.py's rows, for both wire-format versions, on
the whole decoder corpus (every frame, every truncation)."""

import msgpack
import pytest
from frames import CORPUS, RingFrame, tpacket3_block, udp4_frame

from fanoutd import wire
from fanoutd.batch import Batch
from fanoutd.decode import decode_block
from fanoutd.encoder import encode_columns_py, encode_rows_py

np = pytest.importorskip("numpy")
pa = pytest.importorskip("pyarrow")
PAYLOAD = 20
ENCODE = {wire.ROWS_VERSION: encode_rows_py, wire.COLUMNS_VERSION: encode_columns_py}


def corpus_blocks():
    yield [RingFrame(f, sec=1_700_000_000, nsec=i, rxhash=i * 7919, ifindex=i,
                     pkttype=i % 5, vlan_tci=(i if i % 4 == 0 else None),
                     status=(1 << 4) if i % 4 == 0 else 1 << 29)
           for i, f in enumerate(CORPUS)]
    for frame in CORPUS:
        yield [RingFrame(frame[:cut], wire_len=len(frame)) for cut in range(len(frame) + 1)]


def received(version, frames, payload_bytes=PAYLOAD):
    """(the Batch a subscriber makes of the message, decode.py's rows)."""
    block, first, num = tpacket3_block(frames)
    fields = [f.name for f in wire.fields_for(payload_bytes)]
    prefix = wire.batch_prefix(version, "eth0", 2, 77, fields, sensor="rack-7")
    body, _, _ = ENCODE[version](block, first, num, payload_bytes, {}, prefix, 9)
    rows = decode_block(block, first, num, {}, payload_bytes)
    return Batch.from_message(b"pkt.eth0.2", body, "tcp://s:1"), rows, fields


@pytest.mark.parametrize("version", [wire.ROWS_VERSION, wire.COLUMNS_VERSION])
def test_records_and_arrow_hold_the_decoded_rows(version):
    for frames in corpus_blocks():
        batch, rows, fields = received(version, frames)
        assert (batch.v, batch.n, batch.epoch, batch.seq) == (version, len(rows), 77, 9)
        assert (batch.sensor, batch.sensor_name) == ("tcp://s:1", "rack-7")
        assert batch.fields == fields
        by_records = [[getattr(rec, name) for name in fields] for rec in batch.records()]
        assert by_records == rows
        table = batch.to_arrow()
        assert table.schema.names == fields
        for i, name in enumerate(fields):
            column = table.column(name)
            if name == "ts_ns":
                column = column.cast(pa.int64())
            assert column.to_pylist() == [r[i] for r in rows], (version, name)
        assert batch.to_polars().shape == (len(rows), len(fields))


@pytest.mark.parametrize("version", [wire.ROWS_VERSION, wire.COLUMNS_VERSION])
def test_numpy_columns_hold_the_decoded_rows(version):
    for frames in corpus_blocks():
        batch, rows, fields = received(version, frames)
        cols = batch.columns(masked=True)
        assert list(cols) == fields
        for i, name in enumerate(fields):
            want = [r[i] for r in rows]
            got = cols[name]
            if name in ("eth_dst", "eth_src"):
                got = [bytes(x) for x in np.asarray(got)]
                valid = batch.valid(name)
                got = [g if valid is None or valid[j] else None for j, g in enumerate(got)]
            elif isinstance(got, np.ma.MaskedArray):
                got = [None if m else v for v, m in zip(got.data.tolist(),
                                                         np.ma.getmaskarray(got).tolist(),
                                                         strict=True)]
            else:
                got = list(got) if got.dtype == object else got.tolist()
            assert got == want, (version, name)


def test_fixed_width_columns_are_views_of_the_message():
    """No copy: a numpy column shares memory with the bytes msgpack gave the batch."""
    batch, _, _ = received(wire.COLUMNS_VERSION, [RingFrame(udp4_frame(sport=i))
                                                  for i in range(50)])
    sport = batch.columns()["sport"]
    assert sport.tolist() == list(range(50))
    assert not sport.flags.owndata and not sport.flags.writeable
    assert np.shares_memory(sport, np.frombuffer(batch.raw_columns["sport"]["values"],
                                                 np.uint8))
    arrow = batch.to_arrow().column("sport")
    assert arrow.buffers()[1].address == \
        np.frombuffer(batch.raw_columns["sport"]["values"], np.uint8).ctypes.data


def test_unmasked_nulls_read_as_zero_and_valid_says_which():
    frames = [RingFrame(udp4_frame()), RingFrame(udp4_frame()[:20])]  # the second: no ports
    batch, _, _ = received(wire.COLUMNS_VERSION, frames)
    assert batch.columns()["sport"].tolist() == [1000, 0]
    assert batch.valid("sport").tolist() == [True, False]
    assert batch.valid("len") is None
    assert batch.columns()["err"].tolist() == ["", "truncated-ipv4"]


def test_an_unknown_field_and_a_missing_one():
    """A field a newer daemon adds is read by its type; a known field the batch lacks
    is None in a record."""
    batch, _, _ = received(wire.COLUMNS_VERSION, [RingFrame(udp4_frame())], 0)
    body = {"v": 2, "iface": "eth0", "worker": 0, "epoch": 1, "seq": 0, "n": 1,
            "columns": {"sport": batch.raw_columns["sport"],
                        "future": {"type": "uint32", "validity": None,
                                   "values": (7).to_bytes(4, "little")},
                        "odd": {"type": "map<x>", "validity": None, "values": b""}}}
    later = Batch.from_message("pkt.eth0.0", msgpack.packb(body))
    rec = next(later.records())
    assert (rec.sport, rec.future, rec.dport) == (1000, 7, None)
    assert later.to_arrow().schema.names == ["sport", "future"]  # "odd": type unknown


def test_a_message_that_is_not_a_batch():
    with pytest.raises(ValueError, match="version 3"):
        Batch.from_message("pkt.x.0", msgpack.packb({"v": 3}))
    with pytest.raises(ValueError, match="not a fanoutd batch"):
        Batch.from_message("pkt.x.0", msgpack.packb({"v": 2, "iface": "x"}))
