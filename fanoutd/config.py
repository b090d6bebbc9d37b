"""Configuration: YAML file + command-line overrides -> frozen dataclasses.

Everything is validated before any socket is opened. Each problem names its key path (and
the flag, when the value came from one) and the rule it breaks; all problems are reported
together. config/fanoutd.yaml documents every key; settings.py declares each flag, bound
and choice once.

One shape once loaded: the capture keys (interface, workers, filter, ..., fanout, ring)
live only in `interfaces`, one complete CaptureConfig per captured interface. At the top
level of the file they are the defaults every entry inherits (and without `interfaces`,
the one capture).
"""

import os
import pwd
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, NamedTuple

import yaml

from fanoutd import fanout, netdev, ring, settings
from fanoutd.filter import FilterError, compile_expression
from fanoutd.settings import AUTO_KEYS, BY_DEST, BY_KEY, CAPTURE_KEYS, NONE_KEYS, SETTINGS

MAX_WORKERS = fanout.MAX_MEMBERS  # the workers of one interface share a fanout group
# An account of the daemon's own, not `nobody`: any other process running as nobody could
# signal (SIGSTOP) or trace the workers and the proxy.
DEFAULT_USER = "fanoutd"


@dataclass(frozen=True)
class FanoutConfig:
    mode: str = "hash"
    flags: tuple[str, ...] = ()
    group_id: int | None = None  # None: the kernel picks an unused id


@dataclass(frozen=True)
class RingConfig:
    block_size: int = 1 << 19
    block_count: int = 128
    frame_size: int = 2048
    block_timeout_ms: int = 10
    rxhash: bool | None = None  # None: auto, on where the kernel has the hash already

    @property
    def geometry(self) -> ring.RingGeometry:
        return ring.RingGeometry(self.block_size, self.block_count, self.frame_size,
                                 self.block_timeout_ms)


@dataclass(frozen=True)
class CurveConfig:
    secret_key_file: str | None = None  # this publisher's secret key: CURVE on
    clients_dir: str | None = None  # authorised clients' public keys; None: any client


@dataclass(frozen=True)
class PublishConfig:
    endpoint: str = "tcp://127.0.0.1:7440"
    sndhwm: int = 256
    format: str = "columns"  # wire format of batches: columns (version 2) or rows (1)
    curve: CurveConfig = field(default_factory=CurveConfig)
    subscriber_queue_bytes: int = 32 << 20  # each subscriber's queue, at most
    max_subscribers: int = 32  # connections to the public endpoint
    max_subscriptions: int = 64  # per connection
    restart_grace_ms: int = 1000  # a new proxy waits this long for the old one's subscribers


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9740"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_ca_file: str | None = None  # require client certificates it signed (mutual TLS)
    basic_auth_user: str | None = None
    basic_auth_password_sha256: str | None = None
    max_connections: int = 16  # connections open at once (metrics_server.py)
    request_timeout_ms: int = 5_000  # from accept to the answer sent, TLS handshake included


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class SupervisorConfig:
    heartbeat_timeout_ms: int = 10_000
    status_interval_ms: int = 5_000


@dataclass(frozen=True)
class CaptureConfig:
    """One interface's capture: the top-level keys of the same names are the defaults that
    each `interfaces` entry may override."""

    interface: str = "auto"
    workers: int | None = None  # None: one per CPU
    filter: str = ""  # tcpdump syntax; "" captures everything
    promisc: bool = True
    payload_bytes: int = 0
    tunnel_depth: int = 1  # encapsulations decoded through (decode.MAX_TUNNEL_DEPTH at most)
    timestamp: str = "software"
    fanout: FanoutConfig = field(default_factory=FanoutConfig)
    ring: RingConfig = field(default_factory=RingConfig)


assert tuple(f.name for f in fields(CaptureConfig)) == CAPTURE_KEYS


@dataclass(frozen=True)
class Config:
    # The captures, complete. In a file, the capture keys at the top level are the
    # defaults of every entry (an entry names only what differs); without `interfaces`,
    # they make the one capture.
    interfaces: tuple[CaptureConfig, ...] = ()
    # Workers and the proxy drop to it (scripts/install.sh creates the account); None: stay
    # as started.
    user: str | None = DEFAULT_USER
    runtime_dir: str | None = None  # None: $RUNTIME_DIRECTORY, /run/fanoutd or the temp dir
    sensor: str | None = None  # this machine's name in every batch; None: the host name
    publish: PublishConfig = field(default_factory=PublishConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)


class ConfigError(Exception):
    """Invalid configuration: a list of (key, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(f"{key}: {reason}" for key, reason in self.problems)


class _Capture(NamedTuple):
    prefix: str  # "interfaces[N]." for an entry, "" for the one capture of the top level
    config: CaptureConfig
    entry: dict  # what the entry sets itself (the rest it inherits); {} at the top level


class InterfaceUnavailable(ConfigError):
    """The configuration is valid but its interface is not here (yet): a missing resource,
    not a mistake, so `run` exits EX_UNAVAILABLE and a service manager may retry."""


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                resolve: bool = True) -> Config:
    """Read path (if given), apply overrides (flag dest -> value), validate.

    With resolve, `auto` values that depend on this machine (interface, workers) are
    replaced by what they resolve to, so the result is the effective configuration.
    """
    problems: list[tuple[str, str]] = []
    broken: set[str] = set()  # keys whose value has the wrong type: they hold the default
    raw = _read_yaml(path) if path else {}
    labels: dict[str, str] = {}
    for dest, value in (overrides or {}).items():
        if value is not None:
            _apply_flag(raw, dest, value, labels)
    cfg = _build(Config, raw, "", labels, problems, broken, also_known=CAPTURE_KEYS)
    captures = _build_captures(raw, labels, problems, broken)
    cfg = replace(cfg, interfaces=tuple(c.config for c in captures))
    # The rules too, so that one run reports every problem; but not against a default
    # standing in for a value that failed its type check.
    problems.extend(_check(cfg, captures, labels, broken))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    if resolve:
        cfg = _resolve(cfg, captures, labels)
    return cfg


def _apply_flag(raw: dict, dest: str, value: Any, labels: dict[str, str]) -> None:
    """Put a flag's value into the raw file data: flags win over the file."""
    setting = BY_DEST[dest]
    key, flag = setting.key, setting.flag
    entries = raw.get("interfaces")
    if dest == "interface":  # --interface IF, repeatable: capture on these, in this order
        names = value if isinstance(value, list) else [value]
        labels["interface"] = f"interface ({flag})"
        raw["interface"] = names[0]
        if len(names) > 1 or isinstance(entries, list):
            kept = {e.get("interface"): e for e in entries or [] if isinstance(e, dict)}
            raw["interfaces"] = [{**kept.get(name, {}), "interface": name} for name in names]
            for i in range(len(names)):
                labels[f"interfaces[{i}].interface"] = f"interfaces[{i}].interface ({flag})"
        return
    labels[key] = f"{key} ({flag})"
    _set_path(raw, key, value)
    if key.split(".")[0] in CAPTURE_KEYS and isinstance(entries, list):
        for entry in entries:  # a flag also wins over each entry: they inherit it
            if isinstance(entry, dict):
                _del_path(entry, key)


def _build_captures(raw: dict, labels: dict[str, str], problems: list[tuple[str, str]],
                    broken: set[str]) -> list[_Capture]:
    """Each capture: one from the top-level keys, or one per `interfaces` entry, each
    entry merged onto the top-level keys. A problem in an inherited value is reported
    once, at the top level."""
    defaults = {k: raw[k] for k in CAPTURE_KEYS if k in raw}
    # The top-level keys themselves, once (an entry reports only what it sets itself).
    top = _build(CaptureConfig, defaults, "", labels, problems, broken)
    entries = raw.get("interfaces")
    if entries is None:
        return [_Capture("", top, {})]
    if not isinstance(entries, list) or not entries:
        problems.append(("interfaces", "must be a list of mappings, each with at least "
                                       "`interface`"))
        return []
    captures = []
    for i, entry in enumerate(entries):
        prefix = f"interfaces[{i}]."
        if not isinstance(entry, dict) or "interface" not in entry:
            problems.append((prefix.rstrip("."), "must be a mapping with at least "
                                                 "`interface`"))
            continue
        found = []
        capture = _build(CaptureConfig, _merge(defaults, entry), prefix, labels, found,
                         broken)
        problems.extend(p for p in found if _set_in(entry, p[0].split(" ")[0][len(prefix):]))
        captures.append(_Capture(prefix, capture, entry))
    return captures


def _merge(base: dict, over: dict) -> dict:
    """over on top of base, section by section (a `ring` entry changes only its keys)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_in(raw: dict, key: str) -> bool:
    """Whether the dotted key (or a section of it) is set in raw."""
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _del_path(raw: dict, key: str) -> None:
    """Remove the dotted key from raw, if it is there."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError([(path, f"cannot read the config file: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([(path, f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                                  f"offset {e.start}")]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise ConfigError([(path, f"YAML syntax error at {where}: {e.problem}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([(path, f"YAML error: {e}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([(path, "the top level must be a mapping of keys")])
    return data


def _set_path(raw: dict, key: str, value: Any) -> None:
    """Set a flag's value in the raw file data. A section the file gives as something
    other than a mapping is left alone, so validation still reports it."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if part not in node:
            node[part] = {}
        if not isinstance(node[part], dict):
            return
        node = node[part]
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str, labels: dict[str, str],
           problems: list[tuple[str, str]], broken: set[str],
           also_known: tuple[str, ...] = ()) -> Any:
    """Type-check one section against its dataclass; unknown keys are problems (but for
    also_known, checked elsewhere). The keys of values that fail (or of the section) go
    into broken: they keep their defaults."""
    section = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        problems.append((section, f"must be a mapping, got {_kind(raw)}"))
        broken.add(section)
        return cls()
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known and key not in also_known:
            names = [*also_known, *(k for k in known if k not in also_known)]
            problems.append((f"{prefix}{key}", f"unknown key (known: {', '.join(names)})"))
    values = {}
    for name, f in known.items():
        if name not in raw or name == "interfaces":  # interfaces: see _build_captures
            continue
        key = prefix + name
        default = getattr(cls(), name)
        if is_dataclass(default):
            values[name] = _build(type(default), raw[name], key + ".", labels, problems,
                                  broken)
        else:
            ok, value = _coerce(key, raw[name], f.type)
            if ok:
                values[name] = value
            else:
                problems.append((labels.get(key, key), value))
                broken.add(key)
    return replace(cls(), **values)


def _coerce(key: str, value: Any, typ: Any) -> tuple[bool, Any]:
    """(True, typed value) or (False, reason). Flags arrive as strings, YAML as typed values."""
    # An `interfaces` entry's keys are the top-level ones: interfaces[1].workers is workers.
    name = re.sub(r"^interfaces\[\d+\]\.", "", key)
    if name in AUTO_KEYS and value in ("auto", None):
        return True, None
    if name in NONE_KEYS and value in ("none", None):
        return True, None
    if typ == str | None:
        typ = str
    if typ in (int, int | None):
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            suffix = " or auto" if name in AUTO_KEYS else ""
            return False, f"must be an integer{suffix}, got {_kind(value)} {value!r}"
        return True, value
    if typ in (bool, bool | None):
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            value = value.lower() in ("true", "yes", "on")
        if not isinstance(value, bool):
            choices = "true, false or auto" if name in AUTO_KEYS else "true or false"
            return False, f"must be {choices}, got {_kind(value)} {value!r}"
        return True, value
    if typ == tuple[str, ...]:
        if isinstance(value, str):
            value = [] if value.strip() in ("", "none") else value.split(",")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return False, f"must be a list of strings, got {_kind(value)} {value!r}"
        return True, tuple(v.strip() for v in value)
    if not isinstance(value, str):
        return False, f"must be a string, got {_kind(value)} {value!r}"
    return True, value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer",
            float: "a number", str: "a string", type(None): "nothing"}.get(type(value),
                                                                         type(value).__name__)


def _check(cfg: Config, captures: list[_Capture], labels: dict[str, str],
           broken: set[str]) -> list[tuple[str, str]]:
    """Rules between and within values. A rule is not applied to a broken key (one whose
    value failed its type check, or under a section that did): its value is a default."""
    problems = []

    def is_broken(key: str) -> bool:
        return any(key == b or key.startswith(b + ".") for b in broken)

    def bad(key: str, reason: str, *needs: str) -> None:
        """Report reason at key, unless key or a key the rule also reads is broken."""
        if not is_broken(key) and not any(map(is_broken, needs)):
            problems.append((labels.get(key, key), reason))

    total_memory, workers_total = 0, 0
    names: dict[str, str] = {}
    groups: dict[int, str] = {}  # explicit fanout group id -> the interface that has it
    where: Callable[[str], str] = str  # after the loop: the last capture's
    for capture in captures:
        where = _capture_keys(capture)
        c = capture.config
        total_memory += _check_capture(c, where, bad, is_broken)
        if c.interface != "auto" and c.interface in names:
            bad(where("interface"), f"{c.interface} is captured already by "
                                    f"{names[c.interface]}")
        names.setdefault(c.interface, where("interface"))
        group = c.fanout.group_id
        if group is not None and groups.setdefault(group, c.interface) != c.interface:
            bad(where("fanout.group_id"), f"fanout group {group} is {groups[group]}'s "
                                          f"already: a group belongs to one interface "
                                          f"(group ids are per network namespace)")
        workers_total += c.workers or os.cpu_count() or 1
    memory = ring.memory_total()
    if memory and total_memory > memory // 2:
        bad(where("ring.block_count"),
            f"{workers_total} workers' rings take {total_memory >> 20} MiB of kernel memory, "
            f"more than half of this machine's {memory >> 20} MiB")
    reason = endpoint_problem(cfg.publish.endpoint)
    if reason:
        bad("publish.endpoint", reason)
    for setting in SETTINGS:  # the daemon's bounds and choices (settings.py)
        if not setting.capture:
            value = _get(cfg, setting.key)
            reason = setting.bounds_problem(value) or setting.choice_problem(value)
            if reason:
                bad(setting.key, reason)
    try:
        parse_host_port(cfg.metrics.listen)
    except ValueError as e:
        bad("metrics.listen", str(e))
    _check_security(cfg, bad)
    if cfg.sensor is not None and (problem := sensor_problem(cfg.sensor)):
        bad("sensor", problem)
    if cfg.user is not None:
        try:
            pwd.getpwnam(cfg.user)
        except KeyError:
            made = " (scripts/install.sh creates it)" if cfg.user == DEFAULT_USER else ""
            bad("user", f"no such user {cfg.user!r}{made}; or none to keep the user fanoutd "
                        f"starts as")
    return problems


SENSOR_MAX = 64  # HOST_NAME_MAX: the host name, the default, always fits


def sensor_problem(name: str) -> str | None:
    """Why a sensor name is unusable, or None. Subscribers read it as a label, and the
    relay makes a NATS subject token of it (relay.subject_token), so it must be printable
    and of bounded length; the token's forbidden characters are replaced there."""
    if not 0 < len(name) <= SENSOR_MAX or not name.isprintable() or name.strip() != name:
        return (f"must be 1-{SENSOR_MAX} printable characters without surrounding spaces, "
                f"or auto (the host name), got {name!r}")
    return None


def _get(cfg: Any, key: str) -> Any:
    """The value at a dotted key of a config dataclass."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _capture_keys(capture: _Capture) -> Callable[[str], str]:
    """A capture's key name -> the key to report: the entry's own (interfaces[1].workers)
    when the entry sets it, else the top-level one it inherits, so that a bad inherited
    value is reported once."""
    def where(name: str) -> str:
        return capture.prefix + name if _set_in(capture.entry, name) else name
    return where


def _check_capture(c: CaptureConfig, where: Callable[[str], str],
                   bad: Callable[..., None], is_broken: Callable[[str], bool]) -> int:
    """One capture's rules; returns the kernel memory its rings take (0 when unknown)."""
    if (not c.interface or len(c.interface) >= 16
            or any(ch in c.interface for ch in "/:\0") or c.interface.strip() != c.interface
            or not c.interface.isprintable()):
        bad(where("interface"), f"must be an interface name (1-15 characters) or auto, "
                                f"got {c.interface!r}")
    for setting in SETTINGS:  # bounds and choices (settings.py)
        if setting.capture and setting.key != "interface":
            value = _get(c, setting.key)
            reason = setting.bounds_problem(value) or setting.choice_problem(value)
            if reason:
                bad(where(setting.key), reason)
    workers_ok = BY_KEY["workers"].bounds_problem(c.workers) is None
    for flag in c.fanout.flags:
        if flag not in fanout.FLAGS:
            bad(where("fanout.flags"), f"unknown flag {flag!r} (known: "
                                       f"{', '.join(fanout.FLAGS)})")
    unknown = frozenset(f.name for f in fields(RingConfig) if is_broken(where(f"ring.{f.name}")))
    geometry_problems = c.ring.geometry.problems(ring.page_size(), ring.max_page_order(),
                                                 unknown)
    for name, reason in geometry_problems:
        bad(where(f"ring.{name}"), reason)
    if c.filter:
        try:
            compile_expression(c.filter)
        except FilterError as e:
            bad(where("filter"), f"{c.filter!r} does not compile: {e}")
    if geometry_problems or unknown or is_broken(where("workers")) or not workers_ok:
        return 0
    return (c.workers or os.cpu_count() or 1) * c.ring.geometry.size


def _check_security(cfg: Config, bad: Callable[..., None]) -> None:
    """CURVE keys for the publisher; TLS and basic auth for the metrics endpoint."""
    curve = cfg.publish.curve
    if curve.secret_key_file is not None:
        try:
            import zmq.auth

            _, secret = zmq.auth.load_certificate(curve.secret_key_file)
            if secret is None:
                bad("publish.curve.secret_key_file",
                    f"{curve.secret_key_file} holds no secret key (use the *.key_secret "
                    f"file `fanoutd keygen` writes)")
        except (OSError, ValueError) as e:
            bad("publish.curve.secret_key_file", f"cannot load {curve.secret_key_file}: {e}")
        if curve.clients_dir is not None and not os.path.isdir(curve.clients_dir):
            bad("publish.curve.clients_dir", f"{curve.clients_dir} is not a directory")
    elif curve.clients_dir is not None:
        bad("publish.curve.clients_dir",
            "needs publish.curve.secret_key_file (CURVE is off without it)",
            "publish.curve.secret_key_file")
    m = cfg.metrics
    if (m.tls_cert_file is None) != (m.tls_key_file is None):
        bad("metrics.tls_cert_file", "TLS needs both tls_cert_file and tls_key_file",
            "metrics.tls_key_file")
    elif m.tls_cert_file is not None:
        try:
            tls_context(m)
        except (OSError, ValueError) as e:
            bad("metrics.tls_cert_file", f"cannot load the certificate, key or client CA: "
                                         f"{e}", "metrics.tls_key_file", "metrics.client_ca_file")
    elif m.client_ca_file is not None:
        bad("metrics.client_ca_file", "needs tls_cert_file and tls_key_file",
            "metrics.tls_cert_file", "metrics.tls_key_file")
    if (m.basic_auth_user is None) != (m.basic_auth_password_sha256 is None):
        bad("metrics.basic_auth_user", "basic auth needs both basic_auth_user and "
                                       "basic_auth_password_sha256",
            "metrics.basic_auth_password_sha256")
    elif m.basic_auth_password_sha256 is not None and not re.fullmatch(
            r"[0-9a-f]{64}", m.basic_auth_password_sha256):
        bad("metrics.basic_auth_password_sha256",
            "must be 64 lower-case hex digits: printf %s PASSWORD | sha256sum")


def tls_context(m: MetricsConfig) -> ssl.SSLContext:
    """The metrics server's TLS context (TLS 1.2 at least; client certificates verified
    against client_ca_file when it is set)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(m.tls_cert_file, m.tls_key_file)
    if m.client_ca_file is not None:
        context.load_verify_locations(m.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def endpoint_problem(endpoint: str) -> str | None:
    """Why a ZeroMQ bind endpoint is unusable, or None."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        return f"must be tcp://HOST:PORT or ipc://PATH, got {endpoint!r}"
    if scheme == "tcp":
        try:
            parse_host_port(rest)
        except ValueError as e:
            return f"{e} in {endpoint!r}"
    elif not rest:
        return "ipc:// needs a socket path"
    return None


def parse_host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:9740', '[::1]:9740' or '*:9740' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return host.strip("[]"), int(port)


def _resolve(cfg: Config, captures: list[_Capture], labels: dict[str, str]) -> Config:
    """Replace what depends on this machine (auto interface and workers) by what it
    resolves to. A missing interface raises InterfaceUnavailable; hardware timestamps
    that the interface cannot give, ConfigError."""
    missing: list[tuple[str, str]] = []
    unsupported: list[tuple[str, str]] = []
    resolved = []
    for prefix, capture, _ in captures:
        key = f"{prefix}interface"
        interface = capture.interface
        if interface == "auto":
            interface = default_interface()
            if interface is None:
                missing.append((key, "auto found no default route and no other interface "
                                     "that is up; set interface"))
                continue
        else:
            try:
                socket.if_nametoindex(interface)
            except OSError:
                missing.append((labels.get(key, key), f"interface {interface!r} does not "
                                                      f"exist"))
                continue
        if capture.timestamp == "hardware" and not netdev.hardware_rx_timestamps(interface):
            tkey = f"{prefix}timestamp"
            unsupported.append((labels.get(tkey, tkey), f"hardware: {interface} cannot "
                                f"timestamp received packets in hardware (see ethtool -T "
                                f"{interface}); use software"))
        resolved.append(replace(capture, interface=interface,
                                workers=capture.workers or os.cpu_count() or 1))
    if missing:
        raise InterfaceUnavailable(missing)
    if unsupported:
        raise ConfigError(unsupported)
    names = [c.interface for c in resolved]
    if len(set(names)) < len(names):
        raise ConfigError([("interfaces", f"an interface is listed twice once auto is "
                                          f"resolved: {', '.join(names)}")])
    return replace(cfg, interfaces=tuple(resolved),
                   sensor=cfg.sensor or socket.gethostname()[:SENSOR_MAX])


def default_interface() -> str | None:
    """The interface of the IPv4 default route, else the first non-loopback one that is up."""
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) > 7 and parts[1] == "00000000" and parts[7] == "00000000":
                    return parts[0]
    except OSError:
        pass
    for _, name in socket.if_nameindex():
        try:
            with open(f"/sys/class/net/{name}/operstate") as f:
                if name != "lo" and f.read().strip() == "up":
                    return name
        except OSError:
            continue
    return None


def to_dict(cfg: Any, prefix: str = "") -> dict:
    """The config as plain YAML-ready data, with None shown as auto or none."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = to_dict(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple):
            out[f.name] = [to_dict(v) if is_dataclass(v) else v for v in value]
        elif value is None:
            out[f.name] = "none" if prefix + f.name in NONE_KEYS else "auto"
        else:
            out[f.name] = value
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def default_text(setting: settings.Setting) -> str:
    """' (default: from the file, else VALUE)' for a flag's --help: a flag's own default
    is None, which means "as the file says", and the file's default is the key's."""
    value: Any = to_dict(CaptureConfig() if setting.capture else Config())
    for part in setting.key.split("."):
        value = value[part]
    value = {"": '""', "[]": "none", "True": "true", "False": "false"}.get(str(value),
                                                                          str(value))
    return f" (default: from the file, else {value}{setting.default_text})"
