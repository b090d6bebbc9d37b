"""fanoutd.batch: a received batch read through records(), columns(), to_arrow() and
to_polars() gives the same values as decode.py's rows, for both wire-format versions, on
the whole decoder corpus (every frame, every truncation)."""

import msgpack
import pytest
from frames import (
    CORPUS,
    NESTED_VXLAN_GRE,
    RingFrame,
    tcp4_frame,
    tpacket3_block,
    udp4_frame,
    vxlan_frame,
)

from fanoutd import batch as batch_module
from fanoutd import encoder, wire
from fanoutd.batch import Batch
from fanoutd.decode import decode_block
from fanoutd.encoder import BlockEncoder, encode_columns_py, encode_rows_py

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
            if wire.FIELD_BY_NAME[name].layout == "fixed_binary":  # MACs: (n, 6) uint8
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
    is None in a record; the optional fields are there (all null) even so."""
    batch, _, _ = received(wire.COLUMNS_VERSION, [RingFrame(udp4_frame())], 0)
    body = {"v": 2, "iface": "eth0", "worker": 0, "epoch": 1, "seq": 0, "n": 1,
            "columns": {"sport": batch.raw_columns["sport"],
                        "future": {"type": "uint32", "validity": None,
                                   "values": (7).to_bytes(4, "little")},
                        "odd": {"type": "map<x>", "validity": None, "values": b""}}}
    later = Batch.from_message("pkt.eth0.0", msgpack.packb(body))
    rec = next(later.records())
    assert (rec.sport, rec.future, rec.dport) == (1000, 7, None)
    assert later.fields == ["sport", *wire.TUNNEL_FIELDS, "future", "odd"]
    # "odd": type unknown, left out
    assert later.to_arrow().schema.names == ["sport", *wire.TUNNEL_FIELDS, "future"]


# --- optional fields (the tunnel fields) ---------------------------------------------------

PLAIN = [RingFrame(udp4_frame(sport=i)) for i in range(3)]
TUNNELLED = [*PLAIN, RingFrame(vxlan_frame(5001, tcp4_frame()))]  # every tunnel field set


@pytest.fixture(params=["C", "Python"])
def arrow_path(request, monkeypatch):
    """to_arrow() through _fastpath.arrow_capsules, and through pyarrow alone."""
    if request.param == "Python":
        monkeypatch.setattr(batch_module, "arrow_capsules", None)
    elif batch_module.arrow_capsules is None:
        pytest.skip("fanoutd._fastpath is not built")
    return request.param


def test_a_batch_without_tunnels_reads_the_tunnel_fields_as_null(arrow_path):
    plain, rows, fields = received(wire.COLUMNS_VERSION, PLAIN)
    assert not set(wire.TUNNEL_FIELDS) & set(plain.raw_columns)  # left out on the wire
    assert plain.fields == fields and plain.carried == [f for f in fields
                                                         if f not in wire.TUNNEL_FIELDS]
    for name in wire.TUNNEL_FIELDS:
        assert plain.absent(name) and plain.column(name) == [None] * 3
        assert [getattr(rec, name) for rec in plain.records()] == [None] * 3
        assert [rec[name] for rec in plain.records()] == [None] * 3
        assert plain.valid(name).tolist() == [False] * 3
        assert np.ma.getmaskarray(plain.columns(masked=True)[name]).all()
    assert [r["tunnel"] for r in plain.rows()] == [None] * 3
    assert plain.packets == [list(r) for r in rows]
    assert next(plain.records()).as_dict()["inner_src"] is None
    cols = plain.columns()
    assert cols["tunnel_id"].tolist() == [0, 0, 0] and cols["tunnel"].tolist() == [""] * 3
    assert cols["inner_eth_src"].shape == (3, 6) and not cols["inner_eth_src"].any()
    assert list(cols["inner_src"]) == [None] * 3


def test_to_arrow_has_one_schema_with_tunnels_or_without(arrow_path):
    """Batches with and without tunnelled rows, of both versions, and of a daemon older
    than the tunnel fields: one schema, so they concatenate (and fanoutd save writes them
    to one file)."""
    plain, _, fields = received(wire.COLUMNS_VERSION, PLAIN)
    tunnelled, rows, _ = received(wire.COLUMNS_VERSION, TUNNELLED)
    rows_plain, _, _ = received(wire.ROWS_VERSION, PLAIN)
    assert set(wire.TUNNEL_FIELDS) <= set(tunnelled.raw_columns)
    tables = [b.to_arrow() for b in (plain, tunnelled, rows_plain)]
    for table in tables:
        table.validate(full=True)
        assert table.schema == tables[1].schema
        assert table.schema.names == fields
    for name in wire.TUNNEL_FIELDS:
        assert tables[0].column(name).null_count == 3
        assert tables[0].column(name).type == tables[1].column(name).type
    i = fields.index("tunnel")
    assert tables[1].column("tunnel").to_pylist() == [r[i] for r in rows] \
        == [None, None, None, "vxlan"]
    joined = pa.Table.from_batches(tables)
    assert joined.num_rows == 10
    assert joined.column("tunnel_id").to_pylist() == [None] * 6 + [5001] + [None] * 3
    assert batch_module._need("polars").concat([b.to_polars() for b in (plain, tunnelled)]
                                               ).shape == (7, len(fields))


def test_a_batch_of_an_older_daemon_gets_the_tunnel_fields_in_wire_order():
    """Version 1 rows without the tunnel fields (a daemon older than them), payload last:
    the fields as a new daemon sends them; packets and rows line up with them."""
    old_fields = [f for f in wire.FIELDS if f not in wire.TUNNEL_FIELDS] + ["payload"]
    new, rows, fields = received(wire.ROWS_VERSION, PLAIN)
    old_rows = [[v for f, v in zip(fields, r, strict=True) if f not in wire.TUNNEL_FIELDS]
                for r in rows]
    old = Batch("pkt.eth0.2", "eth0", 2, 9, old_fields, old_rows)
    assert old.fields == fields == new.fields and old.carried == old_fields
    assert old.packets == [list(r) for r in rows]
    assert [r["payload"] for r in old.rows()] == [r[-1] for r in rows]
    assert [r["tunnel"] for r in old.rows()] == [None] * 3
    assert old.to_arrow().schema == new.to_arrow().schema
    assert new.packets is new._rows_sent  # every field there: the rows as sent


def test_null_columns_serve_batches_of_any_size(arrow_path):
    """The shared null columns grow for a batch larger than any before."""
    small, _, _ = received(wire.COLUMNS_VERSION, PLAIN, 0)
    n = batch_module._null_rows + 1000
    block, first, num = tpacket3_block([RingFrame(udp4_frame())] * n)
    body, _, _ = encode_columns_py(block, first, num, 0, {},
                                   wire.batch_prefix(2, "eth0", 0, 1), 0)
    large = Batch.from_message(b"pkt.eth0.0", body)
    for batch in (small, large, small):
        table = batch.to_arrow()
        table.validate(full=True)
        assert table.num_rows == batch.n and table.column("inner_src").null_count == batch.n
        assert table.column("tunnel").to_pylist() == [None] * batch.n


def test_null_columns_refuse_a_hostile_row_count(arrow_path):
    """n larger than the columns hold: to_arrow() refuses it (ValueError) before it
    makes null columns of that many rows."""
    plain, _, _ = received(wire.COLUMNS_VERSION, PLAIN)
    body = {"v": 2, "iface": "eth0", "worker": 0, "epoch": 1, "seq": 0, "n": 2**40,
            "columns": {"len": plain.raw_columns["len"]}}
    hostile = Batch.from_message("pkt.eth0.0", msgpack.packb(body))
    with pytest.raises(ValueError, match="more rows than its columns hold"):
        hostile.to_arrow()
    with pytest.raises(ValueError, match="more rows than its columns hold"):
        hostile.column("tunnel")


NESTED = NESTED_VXLAN_GRE


@pytest.mark.parametrize("version", [wire.ROWS_VERSION, wire.COLUMNS_VERSION])
@pytest.mark.parametrize(("depth", "tunnel", "inner"), [
    (0, None, (None, None)), (1, "vxlan", (47, None)), (2, "vxlan", (6, 443))])
def test_block_encoder_decodes_to_its_tunnel_depth(monkeypatch, version, depth, tunnel,
                                                   inner):
    """BlockEncoder(tunnel_depth=N), as a worker makes it (config tunnel_depth), through
    the Python encoders (the C one learns the argument on its own branch)."""
    monkeypatch.setattr(encoder, "ENCODERS", {wire.ROWS_VERSION: encode_rows_py,
                                              wire.COLUMNS_VERSION: encode_columns_py})
    enc = BlockEncoder(version, "eth0", 0, 1, 0, "s", tunnel_depth=depth)
    assert enc.tunnel_depth == depth
    block, first, num = tpacket3_block([RingFrame(udp4_frame()), RingFrame(NESTED)])
    body, n, _ = enc.encode(block, first, num, {}, 0)
    got = Batch.from_message(b"pkt.eth0.0", body)
    assert n == got.n == 2
    recs = list(got.records())
    assert [r.tunnel for r in recs] == [None, tunnel]
    assert (recs[1].inner_proto, recs[1].inner_sport) == inner
    assert recs[1].proto == 17 and recs[1].dport == 4789  # the outer packet, always
    if version == wire.COLUMNS_VERSION:
        assert ("tunnel" in got.raw_columns) == (depth > 0)


def test_a_message_that_is_not_a_batch():
    with pytest.raises(ValueError, match="version 3"):
        Batch.from_message("pkt.x.0", msgpack.packb({"v": 3}))
    with pytest.raises(ValueError, match="not a fanoutd batch"):
        Batch.from_message("pkt.x.0", msgpack.packb({"v": 2, "iface": "x"}))
