"""Every configuration key that a flag sets or a bound limits, declared once: its flag,
its help, its bounds, its choices, whether `auto` or `none` stands for "not set". The
command line (cli.py: argparse for run, check-config, print-config and doctor), the flags'
overrides and the labels of config errors (config.py), and the numeric bounds and choices
checked at validation, all come from this table, in the manner of gunicorn's settings.

The defaults are the config dataclasses' (config.py); config/fanoutd.yaml documents every
key for the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fanoutd import fanout
from fanoutd.decode import MAX_TUNNEL_DEPTH
from fanoutd.wire import FORMATS

# The keys of one interface's capture: at the top level of the file they are the defaults
# of every `interfaces` entry; once loaded, only the entries hold them.
CAPTURE_KEYS = ("interface", "workers", "filter", "promisc", "payload_bytes", "tunnel_depth",
                "timestamp", "fanout", "ring")
TIMESTAMP_SOURCES = ("software", "hardware")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_HWM = 2**31 - 1  # ZeroMQ takes its high-water marks as a C int


@dataclass(frozen=True)
class Setting:
    key: str  # its dotted path in the file: ring.block_size
    help: str
    flag: str | None = None  # the command-line flag that sets it, if any
    metavar: str | None = None
    low: int | None = None  # an integer's bounds, inclusive
    high: int | None = None
    low_text: str = ""  # how a bound reads in an error: "0 (off)"
    high_text: str = ""
    unit: str = ""  # " ms", " bytes"
    choices: tuple[str, ...] = ()  # the strings it may be
    auto: bool = False  # "auto" (None: decided at start-up) is allowed
    none: bool = False  # "none" (None: not set) is allowed
    doctor: bool = False  # `fanoutd doctor` takes the flag too
    default_text: str = ""  # what the default means, in --help: ": one per CPU"
    const: str | None = None  # a flag without a value, that sets the key to this
    repeat: bool = False  # the flag may be given several times (--interface)
    doctor_help: str = ""  # the flag's whole help under `fanoutd doctor`, if other

    @property
    def dest(self) -> str | None:
        """The flag's argparse destination (and the key of the overrides)."""
        return self.flag[2:].replace("-", "_") if self.flag else None

    @property
    def capture(self) -> bool:
        return self.key.split(".")[0] in CAPTURE_KEYS

    def bounds_problem(self, value: Any) -> str | None:
        """Why an integer value is out of bounds, or None."""
        if value is None or (self.low is None and self.high is None):
            return None
        low = self.low if self.low is not None else value
        high = self.high if self.high is not None else value
        if low <= value <= high:
            return None
        auto = " or auto" if self.auto else ""
        return (f"must be between {self.low_text or self.low} and "
                f"{self.high_text or self.high}{self.unit}{auto}, got {value}")

    def choice_problem(self, value: Any) -> str | None:
        if not self.choices or value in self.choices:
            return None
        return f"must be one of {', '.join(self.choices)}, got {value!r}"


SETTINGS = (
    # -- capture (top level: defaults of the interfaces entries)
    Setting("interface", "interface to capture on (or auto); repeat for several",
            flag="--interface", metavar="IF", repeat=True, doctor=True,
            default_text=": the default route's",
            doctor_help="interface to examine, with its interfaces entry in the "
                        "configuration (default: the first entry)"),
    Setting("filter", "capture filter in tcpdump syntax (compiled by libpcap)",
            flag="--filter", metavar="EXPR", default_text=": capture everything"),
    Setting("promisc", "do not put the interface in promiscuous mode", flag="--no-promisc",
            const="false", default_text=": promiscuous"),
    Setting("payload_bytes", "add a `payload` field with the first N bytes after the "
            "headers", flag="--payload-bytes", metavar="N", low=0, high=65535,
            low_text="0 (off)", default_text=": off"),
    Setting("tunnel_depth", "decode through N nested tunnels (PPPoE, MPLS, GRE, VXLAN, "
            "Geneve, IP in IP) into the tunnel and inner_* fields; 0: none",
            flag="--tunnel-depth", metavar="N", low=0, high=MAX_TUNNEL_DEPTH,
            low_text="0 (none)"),
    Setting("timestamp", "software or hardware", flag="--timestamp", metavar="SOURCE",
            choices=TIMESTAMP_SOURCES),
    Setting("workers", "worker processes (or auto)", flag="--workers", metavar="N", low=1,
            high=fanout.MAX_MEMBERS,
            high_text=f"{fanout.MAX_MEMBERS} (members of one fanout group)", auto=True,
            doctor=True, default_text=": one per CPU"),
    Setting("fanout.mode", "hash, lb, cpu, rnd, qm or rollover", flag="--fanout",
            metavar="MODE", choices=tuple(fanout.MODES), doctor=True),
    Setting("fanout.flags", "comma-separated: defrag, rollover, ignore-outgoing (none for "
            "none)", flag="--fanout-flags", metavar="FLAGS", doctor=True),
    Setting("fanout.group_id", "fanout group id 0-65535, or auto", flag="--group-id",
            metavar="ID", low=0, high=fanout.MAX_GROUP_ID, auto=True,
            default_text=": the kernel picks an unused one"),
    Setting("ring.block_size", "ring block size", flag="--block-size", metavar="BYTES",
            doctor=True),
    Setting("ring.block_count", "ring blocks per worker", flag="--block-count", metavar="N",
            doctor=True),
    Setting("ring.frame_size", "ring frame size", flag="--frame-size", metavar="BYTES",
            doctor=True),
    Setting("ring.block_timeout_ms", "block retire timeout, in ms", flag="--block-timeout",
            metavar="MS", doctor=True),
    Setting("ring.rxhash", "ask the kernel for each packet's flow hash (the rxhash field): "
            "true, false or auto", flag="--rxhash", metavar="BOOL", auto=True, doctor=True,
            default_text=": on where the NIC or RPS computes the hash anyway"),
    # -- the daemon
    Setting("user", "user the workers and the proxy drop to (none: stay)", flag="--user",
            metavar="USER", none=True),
    Setting("runtime_dir", "where the workers' socket to the proxy lives (or auto)",
            flag="--runtime-dir", metavar="DIR", auto=True,
            default_text=": $RUNTIME_DIRECTORY, /run/fanoutd or the temp directory"),
    Setting("sensor", "this machine's name in every batch (the `sensor` key; or auto)",
            flag="--sensor", metavar="NAME", auto=True, default_text=": the host name"),
    Setting("publish.endpoint", "ZeroMQ endpoint to bind, tcp://HOST:PORT or ipc://PATH",
            flag="--publish", metavar="ENDPOINT"),
    Setting("publish.sndhwm", "most batches queued for one subscriber", flag="--hwm",
            metavar="N", low=0, high=MAX_HWM, low_text="0 (no limit)",
            high_text=f"{MAX_HWM} (ZeroMQ's limit)"),
    Setting("publish.format", "wire format of batches: columns (version 2) or rows (1)",
            flag="--format", metavar="FORMAT", choices=tuple(FORMATS)),
    Setting("publish.subscriber_queue_bytes", "each subscriber's queue in the proxy",
            low=1 << 16, high=1 << 34, unit=" bytes"),
    Setting("publish.max_subscribers", "subscriber connections at most", low=1,
            high=10_000),
    Setting("publish.max_subscriptions", "subscriptions one connection may send", low=1,
            high=10_000),
    Setting("publish.restart_grace_ms", "how long a new proxy waits for the old one's "
            "subscribers", low=0, high=60_000, unit=" ms"),
    Setting("publish.curve.secret_key_file", "this publisher's CURVE secret key",
            none=True),
    Setting("publish.curve.clients_dir", "the CURVE public keys of the subscribers let in",
            none=True),
    Setting("metrics.listen", "Prometheus listen address", flag="--metrics",
            metavar="HOST:PORT"),
    Setting("metrics.tls_cert_file", "TLS certificate of the metrics endpoint", none=True),
    Setting("metrics.tls_key_file", "TLS key of the metrics endpoint", none=True),
    Setting("metrics.client_ca_file", "CA of the client certificates asked for", none=True),
    Setting("metrics.basic_auth_user", "basic auth user of the metrics endpoint", none=True),
    Setting("metrics.basic_auth_password_sha256", "sha256 of its password", none=True),
    Setting("metrics.max_connections", "metrics connections open at once", low=1,
            high=1024),
    Setting("metrics.request_timeout_ms", "a metrics request's deadline", low=100,
            high=60_000, unit=" ms"),
    Setting("log.level", "debug, info, warning or error", flag="--log-level",
            metavar="LEVEL", choices=LOG_LEVELS),
    Setting("supervisor.heartbeat_timeout_ms", "a worker silent this long is hung",
            low=100, high=3_600_000, unit=" ms"),
    Setting("supervisor.status_interval_ms", "how often STATUS and the stats topic go out",
            low=100, high=3_600_000, unit=" ms"),
)

BY_KEY = {s.key: s for s in SETTINGS}
BY_DEST = {s.dest: s for s in SETTINGS if s.dest}
AUTO_KEYS = frozenset(s.key for s in SETTINGS if s.auto)  # "auto" means None
NONE_KEYS = frozenset(s.key for s in SETTINGS if s.none)  # "none" means None


def add_flags(parser: argparse.ArgumentParser, default_text: Callable[[Setting], str],
              doctor: bool = False) -> None:
    """The settings' flags on a parser: every one (run, check-config, print-config), or
    doctor's. default_text(setting) says in --help where the default comes from."""
    for s in SETTINGS:
        if s.flag is None or (doctor and not s.doctor):
            continue
        help_text = (s.doctor_help if doctor and s.doctor_help
                     else s.help + default_text(s))
        kw: dict[str, Any] = {"dest": s.dest, "help": help_text}
        if s.const is not None:
            kw.update(action="store_const", const=s.const)
        else:
            kw["metavar"] = s.metavar
            if s.repeat and not doctor:
                kw["action"] = "append"
        parser.add_argument(s.flag, **kw)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{flag destination: value} of every settings flag the parser had (None: not given)."""
    return {dest: getattr(args, dest) for dest in BY_DEST if hasattr(args, dest)}
