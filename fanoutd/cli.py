"""Command line: run, check-config, print-config, tail."""

import argparse
import json
import logging
import os
import signal
import sys
import time

from fanoutd import __version__
from fanoutd.config import Config, ConfigError, InterfaceUnavailable, dump, load_config

# Exit statuses; the supervisor's own are in supervisor.py. All are listed in the README.
EXIT_USAGE = 2  # argparse's
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the interface is not there
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

    tail = sub.add_parser("tail", help="print packets from a running fanoutd")
    tail.add_argument("--endpoint", default="tcp://127.0.0.1:7440",
                      help="publish endpoint to connect to (default %(default)s)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--count", type=int, default=0, help="stop after N packets")
    tail.add_argument("--timeout", type=float, default=None,
                      help="stop after this many seconds without packets")
    tail.set_defaults(handler=_cmd_tail)
    return parser


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    p.add_argument("--interface", metavar="IF", help="interface to capture on (or auto)")
    p.add_argument("--workers", metavar="N", help="worker processes (or auto: one per CPU)")
    p.add_argument("--fanout", metavar="MODE", help="hash, lb, cpu, rnd, qm or rollover")
    p.add_argument("--fanout-flags", metavar="FLAGS",
                   help="comma-separated: defrag, rollover, ignore-outgoing (none for none)")
    p.add_argument("--group-id", metavar="ID", help="fanout group id 0-65535, or auto")
    p.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ endpoint to bind")
    p.add_argument("--hwm", metavar="N", help="publish high-water mark, in batches")
    p.add_argument("--metrics", metavar="HOST:PORT", help="Prometheus listen address")
    p.add_argument("--block-size", metavar="BYTES", help="ring block size")
    p.add_argument("--block-count", metavar="N", help="ring blocks per worker")
    p.add_argument("--frame-size", metavar="BYTES", help="ring frame size")
    p.add_argument("--block-timeout", metavar="MS", help="block retire timeout")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("interface", "workers", "fanout", "fanout_flags", "group_id", "publish", "hwm",
            "metrics", "block_size", "block_count", "frame_size", "block_timeout", "log_level")
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
    logging.basicConfig(level=cfg.log.level.upper(), stream=sys.stderr,
                        format="fanoutd[%(process)d]: %(levelname)s: %(message)s")
    from fanoutd.supervisor import Supervisor  # the daemon's modules only when running it

    return Supervisor(cfg).run()


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    print(f"configuration is valid: capture on {cfg.interface} with {cfg.workers} workers")
    return 0


def _cmd_print_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if isinstance(cfg, int):
        return cfg
    sys.stdout.write(dump(cfg))
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from fanoutd.client import Subscriber, to_json_ready

    shown = 0
    with Subscriber(args.endpoint) as sub:
        for pkt in sub.packets(timeout=args.timeout):
            if args.json:
                line = json.dumps(to_json_ready(pkt), separators=(",", ":"))
            else:
                line = format_line(pkt)
            print(line, flush=True)
            shown += 1
            if args.count and shown >= args.count:
                break
        if sub.lost:
            lost = sum(sub.lost.values())
            print(f"fanoutd tail: {lost} batches lost (seq gaps)", file=sys.stderr)
    return 0


PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMP6", 132: "SCTP", 33: "DCCP",
               136: "UDPLite", 47: "GRE", 50: "ESP", 51: "AH"}
ETHERTYPE_NAMES = {0x0800: "IPv4", 0x86DD: "IPv6", 0x0806: "ARP", 0x88CC: "LLDP",
                   0x8847: "MPLS", 0x8863: "PPPoE-D", 0x8864: "PPPoE-S"}


def format_line(pkt: dict) -> str:
    """One packet as a line: time, worker, protocol, source > destination, flags, length."""
    from fanoutd.client import format_ip, format_mac, format_tcp_flags

    ts = pkt["ts_ns"]
    when = time.strftime("%H:%M:%S", time.localtime(ts // 1_000_000_000))
    parts = [f"{when}.{ts % 1_000_000_000 // 1000:06d}", f"w{pkt['worker']}"]
    if pkt.get("vlan"):
        parts.append("vlan " + ".".join(str(v) for v in pkt["vlan"]))
    proto, src, dst = pkt.get("proto"), format_ip(pkt.get("src")), format_ip(pkt.get("dst"))
    ethertype = pkt.get("ethertype")
    if proto is not None:
        parts.append(PROTO_NAMES.get(proto, f"proto-{proto}"))
        if pkt.get("sport") is not None:
            sep = "." if ":" in (src or "") else ":"
            src, dst = f"{src}{sep}{pkt['sport']}", f"{dst}{sep}{pkt['dport']}"
        parts.append(f"{src} > {dst}")
        if pkt.get("tcp_flags") is not None:
            parts.append(f"[{format_tcp_flags(pkt['tcp_flags'])}]")
        if pkt.get("icmp_type") is not None:
            parts.append(f"type {pkt['icmp_type']} code {pkt['icmp_code']}")
        if pkt.get("frag"):
            parts.append("frag")
    elif src is not None:
        parts.append(f"{ETHERTYPE_NAMES.get(ethertype, 'IP')} {src} > {dst}")
    else:
        name = ETHERTYPE_NAMES.get(ethertype) if ethertype is not None else "802.3"
        parts.append(name or f"ethertype 0x{ethertype:04x}")
        parts.append(f"{format_mac(pkt.get('eth_src'))} > {format_mac(pkt.get('eth_dst'))}")
    parts.append(f"len {pkt['len']}")
    if pkt.get("err"):
        parts.append(f"[{pkt['err']}]")
    return " ".join(parts)
