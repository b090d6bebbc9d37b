"""docs/wire-format.md is enough to read version 2: a subscriber written from the document
alone, with msgpack and numpy and nothing of fanoutd, decodes a real daemon's batches into
the values injected."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("numpy")

# The whole subscriber. It runs in `python -I` (no checkout, no current directory on the
# path) and checks that it never imported fanoutd.
SPEC_READER = r'''
import json, socket, sys
import msgpack, numpy as np, zmq

endpoint, want_rows = sys.argv[1], int(sys.argv[2])
FIXED = {"uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "int32": "<i4",
         "int64": "<i8", "timestamp[ns, UTC]": "<i8"}

def bits(buf, n):
    return np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[:n].astype(bool)

def column(col, n):
    t, values = col["type"], col["values"]
    if t in FIXED:
        out = np.frombuffer(values, FIXED[t], n).tolist()
    elif t == "bool":
        out = bits(values, n).tolist()
    elif t.startswith("fixed_size_binary["):
        w = int(t[len("fixed_size_binary["):-1])
        out = [values[i * w:(i + 1) * w].hex() for i in range(n)]
    elif t == "binary":
        ends = np.frombuffer(col["offsets"], "<i4", n + 1)
        out = [values[ends[i]:ends[i + 1]].hex() for i in range(n)]
    elif t == "list<uint16>":
        ends = np.frombuffer(col["offsets"], "<i4", n + 1)
        items = np.frombuffer(values, "<u2").tolist()
        out = [items[ends[i]:ends[i + 1]] for i in range(n)]
    elif t == "dictionary<int8, utf8>":
        out = [col["dictionary"][c] for c in np.frombuffer(values, np.int8, n).tolist()]
    else:
        raise SystemExit(f"type {t} is not in the document")
    if col["validity"] is not None:
        out = [v if ok else None for v, ok in zip(out, bits(col["validity"], n))]
    return out

sock = zmq.Context().socket(zmq.SUB)
sock.subscribe(b"pkt.")
sock.subscribe(b"fanoutd.hello")
sock.connect(endpoint)
rows = []
while len(rows) < want_rows:
    if not sock.poll(15000):
        raise SystemExit(f"only {len(rows)} rows arrived")
    frames = sock.recv_multipart()
    if len(frames) == 1:
        print("ready", flush=True)  # the welcome: every subscription is in effect
        continue
    batch = msgpack.unpackb(frames[1])
    assert batch["v"] == 2 and frames[0] == f"pkt.{batch['iface']}.{batch['worker']}".encode()
    assert batch["sensor"] == socket.gethostname()  # the default: the host name
    n = batch["n"]
    cols = {name: column(col, n) for name, col in batch["columns"].items()}
    rows += [{name: cols[name][i] for name in cols} for i in range(n)]
assert not any(m == "fanoutd" or m.startswith("fanoutd.") for m in sys.modules)
print(json.dumps(rows), flush=True)
'''


def test_a_subscriber_written_from_the_document_reads_real_batches(ns, injector,
                                                                  start_daemon):
    daemon = start_daemon(workers=1, extra=["--payload-bytes", "4"])
    sent = [
        (F.udp4_frame(src="192.0.2.7", dst="192.0.2.8", sport=5353, dport=53,
                      payload=b"abcdef"),
         {"ethertype": 0x0800, "src": "c0000207", "dst": "c0000208", "proto": 17,
          "sport": 5353, "dport": 53, "tcp_flags": None, "err": None, "vlan": [],
          "payload": "61626364", "frag": False}),
        (F.tcp4_frame(src="198.51.100.1", sport=443, dport=40000, flags=0x12),
         {"ethertype": 0x0800, "src": "c6336401", "proto": 6, "sport": 443,
          "dport": 40000, "tcp_flags": 0x12, "err": None}),
        (F.udp4_frame(vlans=((0x8100, 42),), sport=1001),
         {"vlan": [42], "ethertype": 0x0800, "sport": 1001}),
        (F.udp4_frame(sport=1002)[:30],
         {"ethertype": 0x0800, "src": None, "sport": None, "err": "truncated-ipv4",
          "payload": None}),
        (F.eth(F.BROADCAST, F.MAC_A, 0x0806,
               F.arp(1, F.MAC_A, "10.0.0.1", bytes(6), "10.0.0.2")),
         {"ethertype": 0x0806, "src": "0a000001", "dst": "0a000002", "proto": None}),
    ]
    argv = [sys.executable, "-I", "-c", SPEC_READER, daemon.endpoint, str(len(sent))]
    with netlab.in_netns(ns.name):  # ipc endpoint: reachable from here as well
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)
    try:
        out = netlab.LineReader(proc)
        netlab.wait_line(out, lambda line: line.strip() == "ready", 15,
                         "the reader's subscriptions", detail=daemon.logs)
        injector.send_all(frame for frame, _ in sent)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr
    lines = [*out.drain(), *stdout.splitlines()]
    rows = json.loads(next(line for line in lines if line.startswith("[")))
    assert len(rows) == len(sent)
    ifindex = ns.ifindex("cap0")
    for row, (frame, expect) in zip(rows, sent, strict=True):
        assert {k: row[k] for k in expect} == expect, row
        assert row["eth_src"] == frame[6:12].hex()
        assert row["len"] == row["caplen"] == len(frame)
        assert row["ifindex"] == ifindex
        assert row["ts_src"] == "software"
        assert abs(row["ts_ns"] / 1e9 - time.time()) < 60
