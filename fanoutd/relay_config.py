"""`fanoutd relay`'s configuration: its YAML file (-c, config/fanoutd-relay.yaml documents
every key) and its flags, each declared once in RELAY_SETTINGS (settings.Setting, as the
daemon's are), validated together with every problem reported at once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from fanoutd import jetstream
from fanoutd.config import ConfigError, _read_yaml, endpoint_problem, parse_host_port
from fanoutd.settings import LOG_LEVELS, Setting

MAX_REPLICAS = 5  # JetStream's own limit


@dataclass(frozen=True)
class RelayConfig:
    sources: tuple[str, ...] = ("tcp://127.0.0.1:7440",)  # key `from`: the sensors
    nats: tuple[str, ...] = (jetstream.DEFAULT_SERVER,)
    stream: str = jetstream.DEFAULT_STREAM
    replicas: int = 1
    max_age_s: int = 0  # 0: the stream keeps batches until max_bytes says otherwise
    max_bytes: int = 0  # 0: no limit but the servers' disks
    max_in_flight: int = 64  # batches sent to JetStream and not yet acknowledged
    retry_seconds: int = 60  # how long one batch is retried before it counts as failed
    metrics: str = "127.0.0.1:9741"
    log_level: str = "info"
    curve_server_key: str = ""  # "": the sensors publish without CURVE
    curve_client_cert: str = ""  # "": a new key pair at each start


# key -> RelayConfig field, where they differ (`from` is a Python keyword)
_FIELD = {"from": "sources"}

RELAY_SETTINGS = (
    Setting("from", "a sensor's publish endpoint to subscribe to, tcp://HOST:PORT or "
            "ipc://PATH; repeat for several sensors", flag="--from", metavar="ENDPOINT",
            repeat=True),
    Setting("nats", "NATS servers, comma-separated: the relay moves to another one when "
            "one fails", flag="--nats", metavar="URL[,URL...]", repeat=True),
    Setting("stream", "the JetStream stream, created when missing (subjects fanoutd.>)",
            flag="--stream", metavar="NAME"),
    Setting("replicas", "the stream's replicas, when the relay creates it", flag="--replicas",
            metavar="N", low=1, high=MAX_REPLICAS),
    Setting("max_age_s", "the stream keeps a batch this long, when the relay creates it",
            flag="--max-age", metavar="S", low=0, high=10 * 365 * 86400,
            low_text="0 (no limit)", unit=" s"),
    Setting("max_bytes", "the stream keeps this many bytes at most (oldest dropped first), "
            "when the relay creates it", flag="--max-bytes", metavar="BYTES", low=0,
            high=1 << 50, low_text="0 (no limit)"),
    Setting("max_in_flight", "batches sent and not yet acknowledged, at most: when it is "
            "reached the relay stops reading the sensors", flag="--max-in-flight",
            metavar="N", low=1, high=10_000),
    Setting("retry_seconds", "how long a batch is sent again (to any member of the cluster) "
            "before it counts as failed", flag="--retry-seconds", metavar="S", low=1,
            high=86_400, unit=" s"),
    Setting("metrics", "the relay's Prometheus listen address", flag="--metrics",
            metavar="HOST:PORT"),
    Setting("log_level", "debug, info, warning or error", flag="--log-level",
            metavar="LEVEL", choices=LOG_LEVELS),
    Setting("curve_server_key", "the sensors' publisher public key (NAME.key, written by "
            "fanoutd keygen), the same for every sensor: connect with CURVE",
            flag="--curve-server-key", metavar="FILE"),
    Setting("curve_client_cert", "this relay's secret key (NAME.key_secret), which the "
            "sensors' publish.curve.clients_dir must hold the public half of",
            flag="--curve-client-cert", metavar="FILE"),
)
BY_KEY = {s.key: s for s in RELAY_SETTINGS}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML configuration file (default: none, the defaults apply)")
    defaults = RelayConfig()
    for s in RELAY_SETTINGS:
        value = getattr(defaults, _FIELD.get(s.key, s.key))
        shown = ",".join(value) if isinstance(value, tuple) else value
        if s.low_text and value == s.low:
            shown = s.low_text
        if shown == "":
            shown = "none"
        parser.add_argument(s.flag, dest=f"relay_{s.dest}", metavar=s.metavar,
                            action="append" if s.repeat else "store",
                            help=f"{s.help} (default: from the file, else {shown})")


def load_relay_config(path: str | None, args: argparse.Namespace | None = None) -> RelayConfig:
    """The file's keys, then the flags given; ConfigError lists every problem."""
    raw = dict(_read_yaml(path)) if path else {}
    labels: dict[str, str] = {}
    for s in RELAY_SETTINGS:
        value = getattr(args, f"relay_{s.dest}", None) if args is not None else None
        if value is not None:
            raw[s.key] = value
            labels[s.key] = f"{s.key} ({s.flag})"
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = BY_KEY.get(key)
        if setting is None:
            problems.append((key, f"unknown key (known: {', '.join(BY_KEY)})"))
            continue
        label = labels.get(key, key)
        name = _FIELD.get(key, key)
        default = getattr(RelayConfig(), name)
        ok, typed = _coerce(value, default)
        if not ok:
            problems.append((label, typed))
            continue
        reason = setting.bounds_problem(typed) if isinstance(typed, int) else None
        reason = reason or setting.choice_problem(typed)
        if reason:
            problems.append((label, reason))
            continue
        values[name] = typed
    cfg = replace(RelayConfig(), **values)
    problems += _rules(cfg, labels)
    if problems:
        raise ConfigError(problems)
    return cfg


def _coerce(value: Any, default: Any) -> tuple[bool, Any]:
    if isinstance(default, tuple):  # a list, a comma list, or flags given several times
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            return False, f"must be a list of strings, got {value!r}"
        found = tuple(jetstream.parse_servers(items))
        return (True, found) if found else (False, "must name at least one")
    if isinstance(default, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return False, f"must be an integer, got {value!r}"
        return True, value
    if not isinstance(value, str):
        return False, f"must be a string, got {value!r}"
    return True, value


def _rules(cfg: RelayConfig, labels: dict[str, str]) -> list[tuple[str, str]]:
    problems = []
    for endpoint in cfg.sources:
        reason = endpoint_problem(endpoint)
        if reason is None and endpoint.startswith("tcp://*"):
            reason = f"{endpoint!r}: * is for binding; give the sensor's address"
        if reason:
            problems.append((labels.get("from", "from"), reason))
    for url in cfg.nats:
        scheme, sep, _ = url.partition("://")
        if sep and scheme not in ("nats", "tls"):
            problems.append((labels.get("nats", "nats"), f"must be nats://HOST:PORT or "
                                                         f"tls://HOST:PORT, got {url!r}"))
    if not cfg.stream or any(ch in cfg.stream for ch in " .*>/\\\t") \
            or not cfg.stream.isprintable():
        problems.append((labels.get("stream", "stream"), f"a stream name cannot hold "
                                                         f"spaces, . * > / or \\, got "
                                                         f"{cfg.stream!r}"))
    try:
        parse_host_port(cfg.metrics)
    except ValueError as e:
        problems.append((labels.get("metrics", "metrics"), str(e)))
    problems += _curve_problems(cfg, labels)
    return problems


def _curve_problems(cfg: RelayConfig, labels: dict[str, str]) -> list[tuple[str, str]]:
    """Both key files readable and holding their keys, or neither given."""
    server_label = labels.get("curve_server_key", "curve_server_key")
    client_label = labels.get("curve_client_cert", "curve_client_cert")
    if not cfg.curve_server_key:
        if cfg.curve_client_cert:
            return [(client_label, "needs curve_server_key (the sensors' public key)")]
        return []
    from fanoutd.client import key_file_problem  # ZeroMQ: only when keys are given

    problems = []
    for label, path, secret in ((server_label, cfg.curve_server_key, False),
                                (client_label, cfg.curve_client_cert, True)):
        problem = key_file_problem(path, secret) if path else None
        if problem:
            problems.append((label, problem))
    return problems
