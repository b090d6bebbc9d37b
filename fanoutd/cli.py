"""Command line: run, check-config, print-config, tail, doctor, stats, keygen, save, relay."""

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fanoutd import __version__, exits, settings
from fanoutd.config import (
    Config,
    ConfigError,
    InterfaceUnavailable,
    default_text,
    dump,
    endpoint_problem,
    load_config,
    parse_host_port,
)

if TYPE_CHECKING:
    from fanoutd.views import DisplayFilter


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, so with that command's usage
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except BrokenPipeError:  # `fanoutd tail | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, except that a paragraph with indented lines (the exit statuses) is
    kept as written instead of being wrapped into one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            if "\n " in para:
                paragraphs.append("\n".join(indent + line for line in para.splitlines()))
            else:
                paragraphs.append(super()._fill_text(para, width, indent))
        return "\n\n".join(paragraphs)


USAGE = (exits.USAGE, "usage error")
INTERRUPTED = (exits.INTERRUPTED, "interrupted (Ctrl-C)")
CONFIG_STATUSES = (
    (exits.UNAVAILABLE, "an interface does not exist"),
    (exits.CONFIG, "the configuration is invalid (each problem on its own line)"),
)


def _command(sub: Any, name: str, handler: Callable[[argparse.Namespace], int],
             summary: str, statuses: tuple[tuple[int, str], ...],
             description: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the exit statuses it can return."""
    epilog = "exit status:\n" + "\n".join(f"  {code:<4} {meaning}"
                                           for code, meaning in sorted(statuses))
    p = sub.add_parser(name, help=summary, description=description,
                       epilog=epilog, formatter_class=_HelpFormatter)
    p.set_defaults(handler=handler, command_parser=p)
    return p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanoutd", description="Packet-capture daemon: "
                                     "PACKET_FANOUT workers on TPACKET_V3 rings, packet "
                                     "summaries over ZeroMQ, metrics for Prometheus.",
                                     epilog="`fanoutd COMMAND --help` describes a command, "
                                            "its options and its exit statuses.")
    parser.add_argument("--version", action="version", version=f"fanoutd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(sub, "run", _cmd_run, "capture and publish (the daemon)", (
        (0, "stopped by SIGTERM or SIGINT"), USAGE,
        (exits.UNAVAILABLE, "an interface does not exist, a ring cannot be allocated, or "
                           "the publish\n       endpoint or the metrics port cannot be "
                           "bound"),
        (70, "a worker or the proxy kept failing to start (FATAL)"),
        (exits.NOPERM, "permission denied: capture needs CAP_NET_RAW"),
        (exits.CONFIG, "the configuration is invalid (each problem on its own line)")),
        description="Capture on the configured interfaces and publish packet summaries. "
                    "Flags override the configuration file (-c), which overrides the "
                    "defaults.")
    _config_flags(run)

    check = _command(sub, "check-config", _cmd_check_config,
                     "validate a configuration and exit",
                     ((0, "the configuration is valid"), USAGE, *CONFIG_STATUSES),
                     description="Validate the configuration (-c FILE, then the flags) as "
                                 "`run` would, reporting every problem, and exit.")
    _config_flags(check)

    show = _command(sub, "print-config", _cmd_print_config,
                    "print the effective configuration as YAML",
                    ((0, "printed"), USAGE, *CONFIG_STATUSES),
                    description="Print the effective configuration (-c FILE, then the "
                                "flags, auto values resolved) as YAML that check-config "
                                "and run -c accept.")
    _config_flags(show)

    tail = _command(
        sub, "tail", _cmd_tail, "print packets from running fanoutd daemons", (
            (0, "--count packets shown, --timeout passed, or the reader of the output "
                "left"), USAGE,
            (exits.UNAVAILABLE, "no endpoint ever answered (with --timeout); with "
                                "--nats: no server answered,\n       or no nats-py "
                                "(fanoutd[nats])"),
            (exits.NOPERM, "no endpoint could be used, and one refused this client: its "
                          "CURVE handshake\n       failed (wrong server key, client key "
                          "not admitted) or CURVE is on one side only"),
            INTERRUPTED),
        description="Print the packets a running fanoutd publishes, from one or several "
                    "sensors. --proto, --host, --port, --vlan, --tunnel and --worker are display "
                    "filters, applied here, on the subscriber's side: the daemon still "
                    "captures and publishes every packet (the capture filter is the "
                    "daemon's own --filter). Each option may be repeated or given a comma "
                    "list; a packet is shown when it matches one value of every option given.")
    tail.add_argument("--endpoint", action="append", metavar="ENDPOINT", type=_endpoint,
                      help="publish endpoint to connect to, tcp://HOST:PORT or ipc://PATH; "
                           "repeat for several sensors (default: tcp://127.0.0.1:7440)")
    tail.add_argument("--nats", metavar="URL[,URL...]", action="append",
                      help="read the batches `fanoutd relay` stored in JetStream from these "
                           "NATS servers instead of a sensor (needs fanoutd[nats])")
    tail.add_argument("--durable", metavar="NAME",
                      help="with --nats: a durable consumer of this name, which resumes "
                           "where it was and shares its batches with every process of the "
                           "same name (default: none, packets from now on)")
    tail.add_argument("--stream", metavar="NAME", default="FANOUTD",
                      help="with --nats: the stream (default: %(default)s)")
    tail.add_argument("--json", action="store_true",
                      help="one JSON object per line: the wire fields, iface, worker, seq, "
                           "sensor, and time (ISO 8601, UTC), proto_name, ethertype_name")
    tail.add_argument("--count", type=_positive(int), default=None, metavar="N",
                      help="stop after N packets shown (default: no limit)")
    tail.add_argument("--timeout", type=_positive(float), default=None, metavar="S",
                      help="stop after S seconds without packets (default: never)")
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
    tail.add_argument("--tunnel", action="extend", default=[], metavar="NAME",
                      type=_listed(_views_parser("parse_tunnel")),
                      help="the packet went through this tunnel (pppoe, mpls, gre, vxlan, "
                           "geneve, ipip), or through any")
    tail.add_argument("--worker", action="extend", default=[], metavar="N",
                      type=_listed(lambda v: _number(v, 0, 65535, "a worker")),
                      help="worker slot index")
    tail.add_argument("--stats", action="store_true",
                      help="on exit, print per-stream lost batches, duplicates and ring "
                           "restarts on stderr")
    tail.add_argument("--curve-server-key", metavar="FILE", type=_key_file(secret=False),
                      help="the publisher's public key (NAME.key): connect with CURVE "
                           "(default: no CURVE)")
    tail.add_argument("--curve-client-cert", metavar="FILE", type=_key_file(secret=True),
                      help="this client's secret key (NAME.key_secret) (default: a new "
                           "key each time, which a publisher with clients_dir refuses)")

    doctor = _command(
        sub, "doctor", _cmd_doctor,
        "report what affects capture on an interface, and what to change", (
            (0, "nothing to change"), (1, "something should change (the report says what)"),
            USAGE, (exits.UNAVAILABLE, "no such interface, or something could not be read"),
            (exits.NOPERM, "nothing to change found, but some checks need CAP_NET_RAW (run "
                          "as root)"),
            (exits.CONFIG, "the configuration is invalid")),
        description="Report what affects capture on an interface: page size and ring "
                    "geometry, MTU versus what a block holds, VLAN offload, GRO/LRO, flow "
                    "symmetry of the fanout mode, and which fanout modes and flags the "
                    "kernel accepts. The ring, fanout and workers are the configuration's "
                    "(-c FILE: the interfaces entry examined; then the flags, else the "
                    "defaults). A worker's ring is rated by how long it lasts at line rate "
                    "(the link's speed, 10 Gb/s if it reports none, in 64-byte frames): "
                    "under 5 ms change, under 50 ms note. Sends no traffic.")
    doctor.add_argument("-c", "--config", metavar="FILE",
                        help="YAML configuration file (default: none, the defaults apply)")
    settings.add_flags(doctor, default_text, doctor=True)

    keygen = _command(sub, "keygen", _cmd_keygen,
                      "create a CURVE key pair for the publisher or a subscriber", (
                          (0, "the key pair was written"), USAGE,
                          (exits.CANTCREAT, "NAME.key or NAME.key_secret exists already "
                                           "(see --force), DIR is not a\n       directory, "
                                           "or a key file cannot be written")),
                      description="Create a CURVE key pair: DIR/NAME.key, the public key "
                                  "to give out, and DIR/NAME.key_secret (mode 0600). An "
                                  "existing pair is kept unless --force: replacing the "
                                  "publisher's locks every subscriber out.")
    keygen.add_argument("directory", metavar="DIR",
                        help="where to write NAME.key and NAME.key_secret (created if need be)")
    keygen.add_argument("--name", default="fanoutd", help="file name stem (default: %(default)s)")
    keygen.add_argument("--force", action="store_true",
                        help="replace an existing NAME.key / NAME.key_secret")

    save = _command(sub, "save", _cmd_save, "write the published stream to rotated Parquet "
                                            "files", (
        (0, "done (--count, --timeout, SIGTERM or Ctrl-C)"), USAGE,
        (exits.UNAVAILABLE, "no pyarrow, or no sensor ever answered")),
        description="Subscribe to one or several sensors and write every packet to Parquet "
                    "files in DIR, one row per packet with the wire fields and the batch's "
                    "sensor, iface, worker, epoch and seq. A file is written as "
                    "NAME.parquet.part and renamed NAME.parquet once complete; a new one "
                    "starts after --rotate-rows rows or --rotate-seconds seconds (at the "
                    "next batch boundary) and whenever the fields change. SIGTERM or "
                    "Ctrl-C completes the current file. Needs pyarrow (fanoutd[arrow]).")
    save.add_argument("directory", metavar="DIR",
                      help="where the files go (created if missing)")
    save.add_argument("--endpoint", action="append", metavar="ENDPOINT", type=_endpoint,
                      help="publish endpoint to connect to; repeat for several sensors "
                           "(default: tcp://127.0.0.1:7440)")
    save.add_argument("--rotate-rows", type=_positive(int), default=10_000_000, metavar="N",
                      help="start a new file after N rows (default: %(default)s)")
    save.add_argument("--rotate-seconds", type=_positive(float), default=3600.0,
                      metavar="S", help="start a new file after S seconds "
                                        "(default: %(default)s)")
    save.add_argument("--compression", default="zstd",
                      choices=("zstd", "snappy", "gzip", "lz4", "none"),
                      help="Parquet compression (default: %(default)s)")
    save.add_argument("--count", type=_positive(int), default=None, metavar="N",
                      help="stop after N packets, at a batch boundary (default: no limit)")
    save.add_argument("--timeout", type=_positive(float), default=None, metavar="S",
                      help="stop after S seconds without packets (default: never)")
    save.add_argument("--curve-server-key", metavar="FILE",
                      help="the publisher's public key (NAME.key): connect with CURVE "
                           "(default: no CURVE)")
    save.add_argument("--curve-client-cert", metavar="FILE",
                      help="this client's secret key (NAME.key_secret)")

    relay = _command(sub, "relay", _cmd_relay, "store sensors' batches in a NATS JetStream "
                                              "stream", (
        (0, "stopped by SIGTERM or SIGINT"), USAGE,
        (exits.UNAVAILABLE, "no nats-py (fanoutd[nats]), no NATS server answered, the "
                            "stream cannot be\n       found or created, or the metrics "
                            "port cannot be bound"),
        (exits.CONFIG, "the configuration is invalid (each problem on its own line)")),
        description="Subscribe to one or several sensors (--from) and append every batch, "
                    "unchanged, to a JetStream stream (created when missing) on subject "
                    "fanoutd.SENSOR.IFACE.WORKER, with Nats-Msg-Id SENSOR/IFACE/WORKER/"
                    "EPOCH/SEQ so that JetStream stores a batch sent twice once. Flags "
                    "override the configuration file (-c, see config/fanoutd-relay.yaml). "
                    "Needs nats-py (fanoutd[nats]).")
    from fanoutd import relay_config

    relay_config.add_flags(relay)

    stats = _command(sub, "stats", _cmd_stats, "per-worker counters of a running fanoutd", (
        (0, "the table was printed"), USAGE,
        (exits.UNAVAILABLE, "the metrics address cannot be read"), INTERRUPTED),
        description="Print a per-worker table of a running fanoutd's counters (packets/s, "
                    "kernel drops, decode errors, ...), read from its metrics endpoint.")
    stats.add_argument("--metrics", default="127.0.0.1:9740", metavar="HOST:PORT",
                       type=_host_port, help="its metrics address (default: %(default)s)")
    stats.add_argument("--interval", type=_positive(float), default=1.0, metavar="S",
                       help="seconds between the two scrapes that give packets/s "
                            "(default: %(default)s)")
    stats.add_argument("--watch", action="store_true",
                       help="print a new table every interval until interrupted (on a "
                            "terminal, in place)")
    return parser


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="YAML configuration file (default: none, the defaults apply)")
    settings.add_flags(p, default_text)


def _load(args: argparse.Namespace) -> Config | int:
    """The effective configuration, or the exit status after reporting its problems."""
    try:
        return load_config(args.config, settings.overrides(args))
    except ConfigError as e:
        for key, reason in e.problems:
            print(f"fanoutd: {key}: {reason}", file=sys.stderr)
        return exits.UNAVAILABLE if isinstance(e, InterfaceUnavailable) else exits.CONFIG


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
    return Supervisor(cfg, lambda: load_config(args.config, settings.overrides(args))).run()


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


def _positive(kind: type) -> Callable[[str], Any]:
    """argparse type: a number above 0 (int or float)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} above 0, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some of its messages
    return parse


def _endpoint(text: str) -> str:
    """argparse type: an endpoint a fanoutd can publish on, to connect to."""
    if text.startswith("inproc://"):
        raise argparse.ArgumentTypeError(f"{text!r}: inproc:// reaches sockets of the same "
                                         f"process only; use tcp://HOST:PORT or ipc://PATH")
    reason = endpoint_problem(text)
    if reason is None and text.startswith("tcp://") and parse_host_port(text[6:])[0] == "*":
        reason = f"{text!r}: * is for binding; give the publisher's address"
    if reason:
        raise argparse.ArgumentTypeError(reason)
    return text


def _host_port(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _key_file(secret: bool) -> Callable[[str], str]:
    """argparse type: a key file `fanoutd keygen` wrote (with its secret key, if secret)."""
    def check(path: str) -> str:
        from fanoutd.client import key_file_problem

        problem = key_file_problem(path, secret)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return path
    return check


def tail_display_filter(args: argparse.Namespace) -> "DisplayFilter":
    """The display filter of `fanoutd tail`'s options."""
    from fanoutd.views import DisplayFilter

    return DisplayFilter.from_options(args.proto, args.host, args.port, args.vlan, args.worker,
                                      args.tunnel)


def _cmd_tail(args: argparse.Namespace) -> int:
    from fanoutd.client import DEFAULT_ENDPOINT, Subscriber

    show = tail_display_filter(args)
    if args.nats:
        if args.endpoint:
            args.command_parser.error("--endpoint and --nats: one source or the other")
        return _tail_nats(args, show)
    if args.durable:
        args.command_parser.error("--durable needs --nats")
    endpoints = args.endpoint or [DEFAULT_ENDPOINT]
    several = len(endpoints) > 1
    told: set[str] = set()

    def tell_refusals() -> None:
        for endpoint, reason in sub.refused.items():
            if endpoint not in told:
                print(f"fanoutd tail: {endpoint}: {reason}", file=sys.stderr, flush=True)
                told.add(endpoint)

    with Subscriber(endpoints, curve_server_key=args.curve_server_key,
                    curve_client_cert=args.curve_client_cert) as sub:
        # Say when every subscription is in effect, as tcpdump says "listening on": from
        # then on nothing published is missed. Packets that arrive meanwhile are kept.
        sub.wait_ready(min(5.0, args.timeout or 5.0))
        tell_refusals()
        if set(sub.refused) >= set(endpoints):  # ZeroMQ would not try again: give up
            return exits.NOPERM
        live = [e for e in endpoints if e in sub.ready]
        silent = [e for e in endpoints if e not in sub.ready and e not in sub.refused]
        if live:
            print(f"fanoutd tail: listening on {', '.join(live)}", file=sys.stderr,
                  flush=True)
        if silent:
            print(f"fanoutd tail: no answer yet from {', '.join(silent)}; still trying",
                  file=sys.stderr, flush=True)
        try:
            _print_packets(sub.records(timeout=args.timeout), show, args, several)
        except KeyboardInterrupt:
            _tail_summary(sub, args.stats)
            return exits.INTERRUPTED
        _tail_summary(sub, args.stats)
        if sub.ready or sub.last_seq:
            return 0
        # Never connected: --timeout passed without a word from any endpoint.
        tell_refusals()
        silent = [e for e in endpoints if e not in sub.refused]
        if silent:
            print(f"fanoutd tail: no answer from {', '.join(silent)} (is fanoutd publishing "
                  f"there?)", file=sys.stderr)
        return exits.NOPERM if sub.refused else exits.UNAVAILABLE


def _tail_nats(args: argparse.Namespace, show: Any) -> int:
    """`fanoutd tail --nats`: the same lines, from the JetStream stream."""
    from fanoutd.client import JetStreamSubscriber
    from fanoutd.jetstream import MissingNats

    try:
        import nats.errors
    except ImportError:
        print(f"fanoutd tail: {MissingNats()}", file=sys.stderr)
        return exits.UNAVAILABLE
    servers = ",".join(args.nats)
    try:
        sub = JetStreamSubscriber(servers, stream=args.stream, durable=args.durable,
                                  deliver="all" if args.durable else "new",
                                  connect_seconds=min(10.0, args.timeout or 10.0))
    except (OSError, TimeoutError, nats.errors.Error) as e:
        reason = str(e) or "no answer in time"
        print(f"fanoutd tail: no answer from {servers}, or no stream {args.stream} there: "
              f"{reason}", file=sys.stderr)
        return exits.UNAVAILABLE
    with sub:
        consumer = f", durable {args.durable}" if args.durable else ""
        print(f"fanoutd tail: reading stream {args.stream} at {servers}{consumer}",
              file=sys.stderr, flush=True)
        try:
            _print_packets(sub.records(timeout=args.timeout), show, args, show_sensor=True)
        except KeyboardInterrupt:
            return exits.INTERRUPTED
    return 0


def _print_packets(records: Iterable[Any], show: Any, args: argparse.Namespace,
                   show_sensor: bool) -> int:
    """tail's output: each record the display filter `show` passes, as a line or as
    JSON (--json), until --count of them; returns how many were shown."""
    from fanoutd.views import json_line, packet_line

    shown = 0
    for rec in records:
        if show and not show.matches(rec):
            continue
        print(json_line(rec) if args.json else
              packet_line(rec.as_dict(raw=True), show_sensor=show_sensor), flush=True)
        shown += 1
        if args.count and shown >= args.count:
            break
    return shown


def _cmd_save(args: argparse.Namespace) -> int:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("fanoutd save: needs pyarrow: pip install 'fanoutd[arrow]'", file=sys.stderr)
        return exits.UNAVAILABLE
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
        return exits.UNAVAILABLE
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


def _cmd_relay(args: argparse.Namespace) -> int:
    from fanoutd.relay_config import load_relay_config

    for signum in (signal.SIGTERM, signal.SIGINT):  # until the relay's own handlers
        signal.signal(signum, lambda signum, frame: sys.exit(0))
    try:
        cfg = load_relay_config(args.config, args)
    except ConfigError as e:
        for key, reason in e.problems:
            print(f"fanoutd relay: {key}: {reason}", file=sys.stderr)
        return exits.CONFIG
    from fanoutd.relay import run_relay
    from fanoutd.systemd import set_log_context, setup_logging

    setup_logging(cfg.log_level)
    set_log_context(component="relay", stream=cfg.stream)
    return run_relay(cfg)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from fanoutd.doctor import run_doctor

    try:
        cfg = load_config(args.config, settings.overrides(args))
    except ConfigError as e:
        for key, reason in e.problems:
            print(f"fanoutd doctor: {key}: {reason}", file=sys.stderr)
        return exits.UNAVAILABLE if isinstance(e, InterfaceUnavailable) else exits.CONFIG
    return run_doctor(cfg, sys.stdout)


def _cmd_stats(args: argparse.Namespace) -> int:
    from fanoutd.views import read_metrics, stats_table

    in_place = args.watch and sys.stdout.isatty()  # no escape codes into a file or a pipe
    tables = 0
    try:
        before = read_metrics(args.metrics)
        while True:
            time.sleep(args.interval)
            after = read_metrics(args.metrics)
            if in_place:
                print("\033[H\033[J", end="")  # clear the screen
            elif tables:
                print()  # a blank line between tables
            print(stats_table(before, after, args.interval), flush=True)
            tables += 1
            if not args.watch:
                return 0
            before = after
    except OSError as e:
        reason = getattr(e, "reason", None) or e.strerror or e
        print(f"fanoutd stats: cannot read http://{args.metrics}/metrics: {reason}",
              file=sys.stderr)
        return exits.UNAVAILABLE


def _cmd_keygen(args: argparse.Namespace) -> int:
    """zmq.auth's key files: NAME.key (public, give it out) and NAME.key_secret (0600).
    An existing pair is kept unless --force: replacing the publisher's locks every
    subscriber out."""
    import zmq.auth

    directory, name = args.directory, args.name
    if os.path.exists(directory) and not os.path.isdir(directory):
        print(f"fanoutd keygen: {directory}: not a directory", file=sys.stderr)
        return exits.CANTCREAT
    paths = [os.path.join(directory, name + suffix) for suffix in (".key", ".key_secret")]
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not args.force:
        verb = "exists" if len(existing) == 1 else "exist"
        print(f"fanoutd keygen: {' and '.join(existing)} {verb} already; not replaced "
              f"(--force replaces the key pair)", file=sys.stderr)
        return exits.CANTCREAT
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
        return exits.CANTCREAT
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
