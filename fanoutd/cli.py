"""Command line: run, check-config, print-config, tail."""

import argparse
import os
import signal
import sys
import time

from fanoutd import __version__
from fanoutd.config import Config, ConfigError, InterfaceUnavailable, dump, load_config

# Exit statuses; the supervisor's own are in supervisor.py. All are listed in the README.
EXIT_USAGE = 2  # argparse's
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the interface is not there
EXIT_CANTCREAT = 73  # EX_CANTCREAT: keygen cannot (or will not) write its key files
EXIT_CONFIG = 78  # EX_CONFIG: the configuration is invalid


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fanoutd tail | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanoutd", description="Packet-capture daemon: "
                                     "PACKET_FANOUT workers on TPACKET_V3 rings, packet "
                                     "summaries over ZeroMQ, metrics for Prometheus.")
    parser.add_argument("--version", action="version", version=f"fanoutd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="capture and publish (the daemon)")
    _config_flags(run)
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser("check-config", help="validate a configuration and exit")
    _config_flags(check)
    check.set_defaults(handler=_cmd_check_config)

    show = sub.add_parser("print-config", help="print the effective configuration as YAML")
    _config_flags(show)
    show.set_defaults(handler=_cmd_print_config)

    tail = sub.add_parser(
        "tail", help="print packets from running fanoutd daemons",
        description="Print the packets a running fanoutd publishes, from one or several "
                    "sensors. --proto, --host, --port, --vlan and --worker are display "
                    "filters, applied here, on the subscriber's side: the daemon still "
                    "captures and publishes every packet (the capture filter is the "
                    "daemon's own --filter). Each option may be repeated or given a comma "
                    "list; a packet is shown when it matches one value of every option given.")
    tail.add_argument("--endpoint", action="append", metavar="ENDPOINT",
                      help="publish endpoint to connect to; repeat for several sensors "
                           "(default tcp://127.0.0.1:7440)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--count", type=int, default=0, metavar="N",
                      help="stop after N packets shown")
    tail.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="stop after S seconds without packets")
    tail.add_argument("--proto", action="extend", default=[], metavar="PROTO",
                      type=_listed(_views_parser("parse_proto")),
                      help="tcp, udp, icmp, icmp6, sctp, arp, ... or an IP protocol number")
    tail.add_argument("--host", action="extend", default=[], metavar="ADDR",
                      type=_listed(_views_parser("parse_host")),
                      help="source or destination address, or a network (10.0.0.0/8)")
    tail.add_argument("--port", action="extend", default=[], metavar="N",
                      type=_listed(lambda v: _number(v, 0, 65535, "a port")),
                      help="source or destination port (TCP, UDP, SCTP, DCCP)")
    tail.add_argument("--vlan", action="extend", default=[], metavar="ID",
                      type=_listed(lambda v: _number(v, 0, 4095, "a VLAN ID")),
                      help="a VLAN ID the packet carries (any of its tags)")
    tail.add_argument("--worker", action="extend", default=[], metavar="N",
                      type=_listed(lambda v: _number(v, 0, 65535, "a worker")),
                      help="worker slot index")
    tail.add_argument("--stats", action="store_true",
                      help="on exit, print per-stream lost batches, duplicates and ring "
                           "restarts on stderr")
    tail.add_argument("--curve-server-key", metavar="FILE",
                      help="the publisher's public key (NAME.key): connect with CURVE")
    tail.add_argument("--curve-client-cert", metavar="FILE",
                      help="this client's secret key (NAME.key_secret)")
    tail.set_defaults(handler=_cmd_tail)

    doctor = sub.add_parser(
        "doctor", help="report what affects capture on an interface, and what to change",
        description="Report what affects capture on an interface: page size and ring "
                    "geometry, MTU versus what a block holds, VLAN offload, GRO/LRO, flow "
                    "symmetry of the fanout mode, and which fanout modes and flags the "
                    "kernel accepts. The ring, fanout and workers are the configuration's "
                    "(-c FILE: the interfaces entry examined; then the flags, else the "
                    "defaults). A worker's ring is rated by how long it lasts at line rate "
                    "(the link's speed, 10 Gb/s if it reports none, in 64-byte frames): "
                    "under 5 ms change, under 50 ms note. Sends no traffic. Exit status: 0 "
                    "nothing to change, 1 something to change, 77 some checks need "
                    "CAP_NET_RAW (run as root), 69 no such interface or something could not "
                    "be read, 78 invalid configuration.")
    doctor.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    doctor.add_argument("--interface", metavar="IF",
                        help="interface to examine, with its interfaces entry in the "
                             "configuration (default: the first entry)")
    doctor.add_argument("--workers", metavar="N", help="worker processes (or auto)")
    doctor.add_argument("--fanout", metavar="MODE", help="hash, lb, cpu, rnd, qm or rollover")
    doctor.add_argument("--fanout-flags", metavar="FLAGS",
                        help="comma-separated: defrag, rollover, ignore-outgoing")
    doctor.add_argument("--block-size", metavar="BYTES", help="ring block size")
    doctor.add_argument("--block-count", metavar="N", help="ring blocks per worker")
    doctor.add_argument("--frame-size", metavar="BYTES", help="ring frame size")
    doctor.add_argument("--block-timeout", metavar="MS", help="block retire timeout")
    doctor.set_defaults(handler=_cmd_doctor)

    keygen = sub.add_parser("keygen", help="create a CURVE key pair for the publisher or a "
                                           "subscriber")
    keygen.add_argument("directory", help="where to write NAME.key and NAME.key_secret")
    keygen.add_argument("--name", default="fanoutd", help="file name stem (default %(default)s)")
    keygen.add_argument("--force", action="store_true",
                        help="replace an existing NAME.key / NAME.key_secret")
    keygen.set_defaults(handler=_cmd_keygen)

    save = sub.add_parser(
        "save", help="write the published stream to rotated Parquet files",
        description="Subscribe to one or several sensors and write every packet to Parquet "
                    "files in DIRECTORY, one row per packet with the wire fields and the "
                    "batch's sensor, iface, worker, epoch and seq. A file is written as "
                    "NAME.parquet.part and renamed NAME.parquet once complete; a new one "
                    "starts after --rotate-rows rows or --rotate-seconds seconds (at the "
                    "next batch boundary) and whenever the fields change. SIGTERM or "
                    "Ctrl-C completes the current file. Needs pyarrow (fanoutd[arrow]). "
                    "Exit status: 0 done, 2 usage, 69 no pyarrow or no sensor answered.")
    save.add_argument("directory", help="where the files go (created if missing)")
    save.add_argument("--endpoint", action="append", metavar="ENDPOINT",
                      help="publish endpoint to connect to; repeat for several sensors "
                           "(default tcp://127.0.0.1:7440)")
    save.add_argument("--rotate-rows", type=_positive_int, default=10_000_000, metavar="N",
                      help="start a new file after N rows (default %(default)s)")
    save.add_argument("--rotate-seconds", type=float, default=3600.0, metavar="S",
                      help="start a new file after S seconds (default %(default)s)")
    save.add_argument("--compression", default="zstd",
                      choices=("zstd", "snappy", "gzip", "lz4", "none"),
                      help="Parquet compression (default %(default)s)")
    save.add_argument("--count", type=_positive_int, default=None, metavar="N",
                      help="stop after N packets (at a batch boundary)")
    save.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="stop after S seconds without packets")
    save.add_argument("--curve-server-key", metavar="FILE",
                      help="the publisher's public key (NAME.key): connect with CURVE")
    save.add_argument("--curve-client-cert", metavar="FILE",
                      help="this client's secret key (NAME.key_secret)")
    save.set_defaults(handler=_cmd_save)

    stats = sub.add_parser("stats", help="per-worker counters of a running fanoutd")
    stats.add_argument("--metrics", default="127.0.0.1:9740", metavar="HOST:PORT",
                       help="its metrics address (default %(default)s)")
    stats.add_argument("--interval", type=float, default=1.0,
                       help="seconds between the two scrapes that give packets/s")
    stats.add_argument("--watch", action="store_true", help="refresh until interrupted")
    stats.set_defaults(handler=_cmd_stats)
    return parser


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    p.add_argument("--interface", metavar="IF", action="append",
                   help="interface to capture on (or auto); repeat for several")
    p.add_argument("--filter", metavar="EXPR",
                   help="capture filter in tcpdump syntax (compiled by libpcap)")
    p.add_argument("--no-promisc", dest="promisc", action="store_const", const="false",
                   help="do not put the interface in promiscuous mode")
    p.add_argument("--payload-bytes", metavar="N",
                   help="add a `payload` field with the first N bytes after the headers")
    p.add_argument("--timestamp", metavar="SOURCE", help="software (default) or hardware")
    p.add_argument("--workers", metavar="N", help="worker processes (or auto: one per CPU)")
    p.add_argument("--fanout", metavar="MODE", help="hash, lb, cpu, rnd, qm or rollover")
    p.add_argument("--fanout-flags", metavar="FLAGS",
                   help="comma-separated: defrag, rollover, ignore-outgoing (none for none)")
    p.add_argument("--group-id", metavar="ID", help="fanout group id 0-65535, or auto")
    p.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ endpoint to bind")
    p.add_argument("--hwm", metavar="N", help="publish high-water mark, in batches")
    p.add_argument("--format", metavar="FORMAT",
                   help="wire format of batches: columns (version 2, default) or rows (1)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="Prometheus listen address")
    p.add_argument("--block-size", metavar="BYTES", help="ring block size")
    p.add_argument("--block-count", metavar="N", help="ring blocks per worker")
    p.add_argument("--frame-size", metavar="BYTES", help="ring frame size")
    p.add_argument("--block-timeout", metavar="MS", help="block retire timeout")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="where the workers' ipc socket lives (or auto)")
    p.add_argument("--user", metavar="USER",
                   help="user the workers and the proxy drop to (default nobody; none: stay)")


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("interface", "workers", "fanout", "fanout_flags", "group_id", "publish", "hwm",
            "format",
            "metrics", "block_size", "block_count", "frame_size", "block_timeout", "log_level",
            "runtime_dir", "user", "filter", "promisc", "payload_bytes", "timestamp")
    return {k: getattr(args, k) for k in keys}


def _load(args: argparse.Namespace) -> Config | int:
    """The effective configuration, or the exit status after reporting its problems."""
    try:
        return load_config(args.config, _overrides(args))
    except ConfigError as e:
        for key, reason in e.problems:
            print(f"fanoutd: {key}: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(e, InterfaceUnavailable) else EXIT_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    # Until the supervisor installs its handlers, a stop request is still a clean stop.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: sys.exit(0))
    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    from fanoutd.supervisor import Supervisor  # the daemon's modules only when running it
    from fanoutd.systemd import setup_logging

    setup_logging(cfg.log.level)
    return Supervisor(cfg, lambda: load_config(args.config, _overrides(args))).run()


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    captures = ", ".join(f"{c.interface} ({c.workers} workers)" for c in cfg.interfaces)
    print(f"configuration is valid: capture on {captures}")
    return 0


def _cmd_print_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    sys.stdout.write(dump(cfg))
    return 0


def _views_parser(name: str):
    """A parser from fanoutd.views, imported when a value is parsed (not at start-up)."""
    def parse(text: str):
        from fanoutd import views

        return getattr(views, name)(text)
    return parse


def _number(text: str, low: int, high: int, what: str) -> int:
    from fanoutd.views import parse_number

    return parse_number(text, low, high, what)


def _listed(parse):
    """argparse type for "a,b,c": a list of parse(item), usage errors in plain words."""
    def parse_list(text: str) -> list:
        try:
            return [parse(item) for item in text.split(",") if item.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse_list


def _cmd_tail(args: argparse.Namespace) -> int:
    from fanoutd.client import Subscriber
    from fanoutd.views import DisplayFilter, packet_line

    endpoints = args.endpoint or ["tcp://127.0.0.1:7440"]
    show = DisplayFilter.from_options(args.proto, args.host, args.port, args.vlan, args.worker)
    several = len(endpoints) > 1
    shown = 0
    with Subscriber(endpoints, curve_server_key=args.curve_server_key,
                    curve_client_cert=args.curve_client_cert) as sub:
        # Say when every subscription is in effect, as tcpdump says "listening on": from
        # then on nothing published is missed. Packets that arrive meanwhile are kept.
        if sub.wait_ready(min(5.0, args.timeout or 5.0)):
            print(f"fanoutd tail: listening on {', '.join(endpoints)}", file=sys.stderr,
                  flush=True)
        else:
            silent = ", ".join(e for e in endpoints if e not in sub.ready)
            print(f"fanoutd tail: no answer yet from {silent}; still trying", file=sys.stderr,
                  flush=True)
        try:
            for rec in sub.records(timeout=args.timeout):
                if show and not show.matches(rec):
                    continue
                if args.json:
                    line = rec.to_json()
                else:
                    line = packet_line(rec.as_dict(raw=True), show_sensor=several)
                print(line, flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    break
        except KeyboardInterrupt:
            _tail_summary(sub, args.stats)
            return 130
        _tail_summary(sub, args.stats)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _cmd_save(args: argparse.Namespace) -> int:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("fanoutd save: needs pyarrow: pip install 'fanoutd[arrow]'", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from fanoutd.client import Subscriber
    from fanoutd.save import ParquetSink

    endpoints = args.endpoint or ["tcp://127.0.0.1:7440"]
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stopping.append(signum))
    sink = ParquetSink(args.directory, args.rotate_rows, args.rotate_seconds,
                       "none" if args.compression == "none" else args.compression)
    last_packet = time.monotonic()
    try:
        with Subscriber(endpoints, curve_server_key=args.curve_server_key,
                        curve_client_cert=args.curve_client_cert) as sub:
            if sub.wait_ready(min(5.0, args.timeout or 5.0)):
                print(f"fanoutd save: listening on {', '.join(endpoints)}, writing to "
                      f"{args.directory}", file=sys.stderr, flush=True)
            while not stopping:
                for batch in sub.batches(timeout=0.25):
                    sink.add(batch)
                    last_packet = time.monotonic()
                    if (args.count and sink.totals.rows >= args.count) or stopping:
                        stopping.append(0)
                        break
                sink.tick()
                if args.timeout and time.monotonic() - last_packet >= args.timeout:
                    break
            lost = sum(sub.lost.values())
            never = [e for e in endpoints if e not in sub.ready]
    finally:
        sink.close()
    t = sink.totals
    print(f"fanoutd save: {t.rows:,} packets in {t.batches:,} batches, {t.files} files in "
          f"{args.directory}; {lost} batches lost (seq gaps)", file=sys.stderr)
    if t.batches == 0 and len(never) == len(endpoints):
        print(f"fanoutd save: no answer from {', '.join(never)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def _tail_summary(sub, stats: bool) -> None:
    """On stderr: lost batches (always, when any), and with --stats every stream's
    counts."""
    if stats:
        streams = sorted(set(sub.last_seq) | set(sub.lost))
        for key in streams:
            print(f"fanoutd tail: {key.sensor} {key.iface} worker {key.worker}: "
                  f"last seq {sub.last_seq.get(key)}, {sub.lost.get(key, 0)} batches lost, "
                  f"{sub.restarts.get(key, 0)} restarts", file=sys.stderr)
        print(f"fanoutd tail: {sum(sub.lost.values())} batches lost, {sub.duplicates} "
              f"duplicates, {len(streams)} streams", file=sys.stderr)
    elif sub.lost:
        lost = sum(sub.lost.values())
        print(f"fanoutd tail: {lost} batches lost (seq gaps)", file=sys.stderr)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from fanoutd.doctor import run_doctor

    keys = ("interface", "workers", "fanout", "fanout_flags", "block_size", "block_count",
            "frame_size", "block_timeout")
    try:
        cfg = load_config(args.config, {k: getattr(args, k) for k in keys})
    except ConfigError as e:
        for key, reason in e.problems:
            print(f"fanoutd doctor: {key}: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(e, InterfaceUnavailable) else EXIT_CONFIG
    return run_doctor(cfg, sys.stdout)


def _cmd_stats(args: argparse.Namespace) -> int:
    from fanoutd.views import read_metrics, stats_table

    try:
        before = read_metrics(args.metrics)
        while True:
            time.sleep(args.interval)
            after = read_metrics(args.metrics)
            if args.watch:
                print("\033[H\033[J", end="")  # clear the screen
            print(stats_table(before, after, args.interval), flush=True)
            if not args.watch:
                return 0
            before = after
    except OSError as e:
        reason = getattr(e, "reason", None) or e.strerror or e
        print(f"fanoutd stats: cannot read http://{args.metrics}/metrics: {reason}",
              file=sys.stderr)
        return EXIT_UNAVAILABLE


def _cmd_keygen(args: argparse.Namespace) -> int:
    """zmq.auth's key files: NAME.key (public, give it out) and NAME.key_secret (0600).
    An existing pair is kept unless --force: replacing the publisher's locks every
    subscriber out."""
    import zmq.auth

    directory, name = args.directory, args.name
    if os.path.exists(directory) and not os.path.isdir(directory):
        print(f"fanoutd keygen: {directory}: not a directory", file=sys.stderr)
        return EXIT_CANTCREAT
    paths = [os.path.join(directory, name + suffix) for suffix in (".key", ".key_secret")]
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not args.force:
        verb = "exists" if len(existing) == 1 else "exist"
        print(f"fanoutd keygen: {' and '.join(existing)} {verb} already; not replaced "
              f"(--force replaces the key pair)", file=sys.stderr)
        return EXIT_CANTCREAT
    try:
        os.makedirs(directory, exist_ok=True)
        for path in existing:  # new files, so the secret one gets 0600 whatever the old had
            os.unlink(path)
        old_umask = os.umask(0o077)
        try:
            public, secret = zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old_umask)
        os.chmod(public, 0o644)
    except OSError as e:
        print(f"fanoutd keygen: {e.filename or directory}: {e.strerror}", file=sys.stderr)
        return EXIT_CANTCREAT
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
