"""Config: defaults, YAML and flag overrides, and one clear problem per broken rule."""

import re
import socket

import pytest
import yaml
from configkeys import int_keys, nested

from fanoutd.config import (
    CAPTURE_KEYS,
    CaptureConfig,
    ConfigError,
    InterfaceUnavailable,
    dump,
    load_config,
)


def problems(path=None, **overrides):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, resolve=False)
    return info.value.problems


def write(tmp_path, text):
    path = tmp_path / "fanoutd.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_config_is_valid_and_equals_the_defaults():
    shipped = load_config("config/fanoutd.yaml", resolve=False)
    assert shipped == load_config(None, resolve=False)
    assert shipped.interfaces == (CaptureConfig(),)


@pytest.mark.parametrize("text, flag, want", [
    ("", None, None), ("ring: {rxhash: auto}\n", None, None),
    ("ring: {rxhash: true}\n", None, True), ("ring: {rxhash: true}\n", "auto", None),
    ("ring: {rxhash: auto}\n", "false", False), ("", "on", True),
])
def test_rxhash_is_true_false_or_auto(tmp_path, text, flag, want):
    overrides = {"rxhash": flag} if flag is not None else {}
    cfg = load_config(write(tmp_path, text or "{}\n"), overrides, resolve=False)
    assert cfg.interfaces[0].ring.rxhash is want
    shown = yaml.safe_load(dump(cfg))["interfaces"][0]["ring"]["rxhash"]
    assert shown == ("auto" if want is None else want)


def test_yaml_values_and_flag_overrides(tmp_path):
    path = write(tmp_path, "interface: lo\nworkers: 3\nfanout: {mode: lb, flags: []}\n"
                           "ring: {block_size: 65536}\n")
    loaded = load_config(path, {"workers": "5", "block_count": "4", "group_id": "77",
                                "fanout_flags": "defrag,rollover"}, resolve=False)
    (cfg,) = loaded.interfaces  # the one capture: the capture keys live there only
    assert not hasattr(loaded, "workers") and not hasattr(loaded, "ring")
    assert (cfg.interface, cfg.workers, cfg.fanout.mode) == ("lo", 5, "lb")
    assert cfg.fanout.flags == ("defrag", "rollover")
    assert cfg.fanout.group_id == 77
    assert (cfg.ring.block_size, cfg.ring.block_count) == (65536, 4)


def test_auto_values_resolve_to_this_machine():
    (cfg,) = load_config(None, {"interface": "lo"}).interfaces
    assert cfg.interface == "lo"
    assert cfg.workers >= 1
    assert load_config(None, {"interface": "lo", "workers": "auto"}).interfaces[0].workers \
        == cfg.workers


def test_print_config_round_trips(tmp_path):
    cfg = load_config(None, {"interface": "lo", "workers": "2", "group_id": "9"})
    again = load_config(write(tmp_path, dump(cfg)), resolve=False)
    assert again == cfg


@pytest.mark.parametrize("overrides, key, words", [
    ({"block_size": "1000"}, "ring.block_size (--block-size)", "multiple of the page size"),
    ({"block_size": "8388608"}, "ring.block_size (--block-size)", "PAGE_SIZE << MAX_ORDER"),
    ({"block_size": "12288"}, "ring.block_size (--block-size)", "power of two"),
    ({"frame_size": "100"}, "ring.frame_size (--frame-size)", "TPACKET_ALIGNMENT"),
    ({"frame_size": "64"}, "ring.frame_size (--frame-size)", "larger than the frame header"),
    ({"block_size": "4096", "frame_size": "8192"}, "ring.frame_size (--frame-size)",
     "fit in a block"),
    ({"block_count": "1"}, "ring.block_count (--block-count)", "at least 2"),
    ({"block_timeout": "0"}, "ring.block_timeout_ms (--block-timeout)", "between 1 and"),
    ({"fanout": "bogus"}, "fanout.mode (--fanout)", "hash, lb, cpu, rollover, rnd, qm"),
    ({"fanout_flags": "defrag,nope"}, "fanout.flags (--fanout-flags)", "unknown flag 'nope'"),
    ({"group_id": "70000"}, "fanout.group_id (--group-id)", "between 0 and 65535"),
    ({"group_id": "x"}, "fanout.group_id (--group-id)", "integer or auto"),
    ({"workers": "0"}, "workers (--workers)", "between 1 and 256"),
    ({"workers": "many"}, "workers (--workers)", "integer or auto"),
    ({"publish": "udp://x:1"}, "publish.endpoint (--publish)", "tcp://HOST:PORT or ipc://"),
    ({"publish": "tcp://127.0.0.1:99999"}, "publish.endpoint (--publish)", "between 1 and"),
    ({"metrics": "9740"}, "metrics.listen (--metrics)", "HOST:PORT"),
    ({"log_level": "loud"}, "log.level (--log-level)", "debug, info"),
    ({"interface": "x" * 16}, "interface (--interface)", "1-15 characters"),
])
def test_each_broken_rule_names_key_flag_and_rule(overrides, key, words):
    found = problems(**overrides)
    assert any(k == key and words in reason for k, reason in found), found


def test_every_problem_is_reported_at_once():
    found = problems(block_size="1000", fanout="bogus", workers="0")
    keys = {k.split(" ")[0] for k, _ in found}
    assert {"ring.block_size", "fanout.mode", "workers"} <= keys


@pytest.mark.parametrize("text, key, words", [
    ("ring:\n  block_sise: 4096\n", "ring.block_sise", "unknown key"),
    ("surprise: 1\n", "surprise", "unknown key"),
    ("ring: 5\n", "ring", "must be a mapping"),
    ("workers: true\n", "workers", "must be an integer"),
    ("ring: {rxhash: maybe}\n", "ring.rxhash", "true, false or auto"),
    ("metrics: {max_connections: 0}\n", "metrics.max_connections", "between 1 and 1024"),
    ("metrics: {request_timeout_ms: 99}\n", "metrics.request_timeout_ms",
     "between 100 and 60000 ms"),
    ("fanout: {flags: defrag}\n", "fanout.flags", None),
    ("- a\n- b\n", None, "top level must be a mapping"),
    ("ring:\n  block_size: [1\n", None, "YAML syntax error at line 3"),
])
def test_bad_files_name_the_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    if key == "fanout.flags":  # a single string is accepted as a comma-separated list
        assert load_config(path, resolve=False).interfaces[0].fanout.flags == ("defrag",)
        return
    found = problems(path)
    expected_key = path if key is None else key  # file-level problems name the file
    assert any(k == expected_key and words in reason for k, reason in found), found


def test_missing_file_and_missing_interface(tmp_path):
    found = problems(str(tmp_path / "nope.yaml"))
    assert "cannot read the config file" in found[0][1]
    # A missing interface is a missing resource, not a config mistake: a different status.
    with pytest.raises(InterfaceUnavailable) as info:
        load_config(None, {"interface": "nosuchif0"})
    assert info.value.problems == [("interface (--interface)",
                                    "interface 'nosuchif0' does not exist")]


def test_a_flag_does_not_hide_a_broken_section(tmp_path):
    found = problems(write(tmp_path, "ring: 5\n"), block_size="65536")
    assert ("ring", "must be a mapping, got an integer") in found


def test_negative_flag_values_get_the_real_rule():
    assert problems(hwm="-1") == [("publish.sndhwm (--hwm)",
                                   "must be between 0 (no limit) and 2147483647 (ZeroMQ's "
                                   "limit), got -1")]


@pytest.mark.parametrize("name", ["ca\0p0", "eth0:1", " eth0", "eth\t0"])
def test_interface_names_the_kernel_cannot_have(tmp_path, name):
    path = write(tmp_path, yaml.safe_dump({"interface": name}))
    assert [k for k, _ in problems(path)] == ["interface"]


def test_not_utf8_file(tmp_path):
    path = tmp_path / "fanoutd.yaml"
    path.write_bytes(b"interface: lo\n# caf\xe9\n")
    assert problems(str(path)) == [(str(path), "not UTF-8 text: byte 0xe9 at offset 19")]


def test_a_ring_larger_than_half_the_memory_is_refused():
    found = problems(block_size="4194304", block_count="100000", workers="2")
    assert found[0][0] == "ring.block_count (--block-count)"
    assert "more than half of this machine's" in found[0][1]


def test_auto_in_an_interfaces_entry(tmp_path):
    """An entry takes the same `auto` values as the top level (print-config writes them)."""
    path = write(tmp_path, "interfaces:\n  - interface: lo\n    workers: auto\n"
                           "    fanout: {group_id: auto}\n")
    entry = load_config(path, resolve=False).interfaces[0]
    assert (entry.workers, entry.fanout.group_id) == (None, None)
    found = problems(write(tmp_path, "interfaces:\n  - interface: lo\n    workers: many\n"))
    assert found == [("interfaces[0].workers", "must be an integer or auto, got a string "
                                               "'many'")]


def keys_of(found):
    return sorted(k for k, _ in found)


def test_unknown_keys_type_errors_and_rules_are_all_reported(tmp_path):
    """One run names every problem: unknown keys, values of the wrong type and broken
    rules, each once."""
    path = write(tmp_path, "surprise: 1\nworkers: many\n"
                           "ring: {block_size: 1000, block_cuont: 3}\n"
                           "fanout: {mode: bogus}\nlog: {level: loud}\n")
    assert keys_of(problems(path)) == ["fanout.mode", "log.level", "ring.block_cuont",
                                       "ring.block_size", "surprise", "workers"]


def test_a_value_of_the_wrong_type_gets_no_rule_error_from_its_default(tmp_path):
    # block_size's default (512 KiB) would make frame_size "not fit in a block".
    found = problems(write(tmp_path, "ring: {block_size: big, frame_size: 1048576}\n"))
    assert keys_of(found) == ["ring.block_size"], found
    # ... but a rule that does not involve the broken value is still checked.
    found = problems(write(tmp_path, "ring: {block_size: big, frame_size: 1000, "
                                     "block_count: 1}\n"))
    assert keys_of(found) == ["ring.block_count", "ring.block_size", "ring.frame_size"]
    # CURVE is not "off" because its key file has the wrong type; nor is TLS half set.
    found = problems(write(tmp_path, "publish: {curve: {secret_key_file: 5, "
                                     "clients_dir: /tmp}}\n"
                                     "metrics: {tls_cert_file: [a], tls_key_file: k.pem}\n"))
    assert keys_of(found) == ["metrics.tls_cert_file", "publish.curve.secret_key_file"]
    # A section that is not a mapping: nothing under it is judged by its defaults.
    found = problems(write(tmp_path, "ring: 5\nworkers: 0\n"))
    assert keys_of(found) == ["ring", "workers"]


def test_an_inherited_problem_is_reported_once(tmp_path):
    """A bad top-level value that every entry inherits is one line, at the top level;
    an entry's own bad value is named in the entry."""
    text = ("ring: {block_size: 1000}\ninterfaces:\n  - interface: lo\n"
            "  - interface: lo2\n    workers: 0\n    ring: {frame_size: 100}\n")
    found = problems(write(tmp_path, text))
    assert keys_of(found) == ["interfaces[1].ring.frame_size", "interfaces[1].workers",
                              "ring.block_size"], found
    path = write(tmp_path, "interfaces:\n  - interface: lo\n  - interface: lo2\n"
                           "    ring: {block_size: 8192}\n")
    found = problems(path, block_size="1000", workers="many")
    assert keys_of(found) == ["ring.block_size (--block-size)", "workers (--workers)"], found
    assert load_config(path, {"block_size": "65536"}, resolve=False).interfaces[1] \
        .ring.block_size == 65536  # the flag still wins over the entry


TOO_LARGE = (2**40, 2**64)  # beyond every bound (the largest: 2**34 bytes of queue)


def test_int_keys_are_found():
    assert {"workers", "ring.block_count", "publish.sndhwm",
            "supervisor.status_interval_ms"} <= set(int_keys())


@pytest.mark.parametrize("value", TOO_LARGE)
@pytest.mark.parametrize("key", int_keys())
def test_every_integer_key_has_an_upper_bound(tmp_path, key, value):
    """A value too large for any key is refused at validation, on one line that names the
    key and its bound (not an OverflowError once running), at the top level and, for a
    capture key, in an `interfaces` entry."""
    texts = {key: nested(key, value)}
    if key.split(".")[0] in CAPTURE_KEYS:
        entry = {"interface": "lo", **nested(key, value)}
        texts[f"interfaces[0].{key}"] = {"interfaces": [entry]}
    for where, data in texts.items():
        found = problems(write(tmp_path, yaml.safe_dump(data)))
        assert len(found) == 1 and found[0][0] == where, found
        reason = found[0][1]
        assert reason.endswith(f"got {value}"), reason
        bounds = [int(n) for n in re.findall(r"\d+", reason.removesuffix(f"got {value}"))]
        assert any(n < value for n in bounds), f"{where}: no bound named: {reason}"


def test_two_interfaces_cannot_have_one_fanout_group(tmp_path):
    """Fanout group ids are per network namespace: the kernel refuses a second interface
    in a group, so the configuration does."""
    found = problems(write(tmp_path, "interfaces:\n  - interface: lo\n"
                                     "    fanout: {group_id: 5}\n  - interface: lo2\n"
                                     "    fanout: {group_id: 5}\n"))
    assert found == [("interfaces[1].fanout.group_id", "fanout group 5 is lo's already: a "
                      "group belongs to one interface (group ids are per network "
                      "namespace)")], found
    found = problems(write(tmp_path, "fanout: {group_id: 5}\ninterfaces:\n"
                                     "  - interface: lo\n  - interface: lo2\n"))
    assert keys_of(found) == ["fanout.group_id"], found
    path = write(tmp_path, "fanout: {group_id: 5}\ninterfaces:\n  - interface: lo\n"
                           "  - interface: lo2\n    fanout: {group_id: 6}\n")
    assert [c.fanout.group_id for c in load_config(path, resolve=False).interfaces] == [5, 6]
@pytest.mark.parametrize("key, low, high", [
    ("subscriber_queue_bytes", 65536, 2**34), ("max_subscribers", 1, 10_000),
    ("max_subscriptions", 1, 10_000), ("restart_grace_ms", 0, 60_000)])
def test_publisher_limits_are_bounded(tmp_path, key, low, high):
    for value in (low, high):
        cfg = load_config(write(tmp_path, f"publish: {{{key}: {value}}}\n"), resolve=False)
        assert getattr(cfg.publish, key) == value
    for value in (low - 1, high + 1):
        found = problems(write(tmp_path, f"publish: {{{key}: {value}}}\n"))
        assert found == [(f"publish.{key}", f"must be between {low} and {high}"
                          + {"subscriber_queue_bytes": " bytes",
                             "restart_grace_ms": " ms"}.get(key, "") + f", got {value}")]


def test_sensor_defaults_to_the_host_name_and_is_checked(tmp_path):
    cfg = load_config(None, {"interface": "lo"})
    assert cfg.sensor == socket.gethostname()
    assert yaml.safe_load(dump(cfg))["sensor"] == cfg.sensor  # print-config shows it
    assert load_config(None, {"interface": "lo", "sensor": "rack-7"}).sensor == "rack-7"
    assert load_config(write(tmp_path, "sensor: edge\n"), resolve=False).sensor == "edge"
    for bad in ("", " x", "a\tb", "x" * 65):
        (found,) = problems(sensor=bad)
        assert found[0] == "sensor (--sensor)" and "printable" in found[1], found


def test_tunnel_depth(tmp_path):
    """tunnel_depth: 0 (none) to decode.MAX_TUNNEL_DEPTH, default 1; from the file, per
    interface, or --tunnel-depth; anything else is refused naming the key and why."""
    assert load_config(None, resolve=False).interfaces[0].tunnel_depth == 1
    assert load_config(None, {"tunnel_depth": "0"}, resolve=False).interfaces[0] \
        .tunnel_depth == 0
    path = write(tmp_path, "tunnel_depth: 2\ninterfaces:\n  - interface: lo\n"
                           "  - interface: lo2\n    tunnel_depth: 4\n")
    assert [c.tunnel_depth for c in load_config(path, resolve=False).interfaces] == [2, 4]
    assert [c.tunnel_depth for c in load_config(path, {"tunnel_depth": "3"},
                                                resolve=False).interfaces] == [3, 3]
    assert yaml.safe_load(dump(load_config(path, resolve=False)))["interfaces"][1][
        "tunnel_depth"] == 4  # print-config shows it
    assert problems(tunnel_depth="5") == [
        ("tunnel_depth (--tunnel-depth)", "must be between 0 (none) and 4, got 5")]
    assert problems(tunnel_depth="-1")[0][0] == "tunnel_depth (--tunnel-depth)"
    (found,) = problems(write(tmp_path, "tunnel_depth: deep\n"))
    assert found == ("tunnel_depth", "must be an integer, got a string 'deep'")
    (found,) = problems(write(tmp_path, "interfaces:\n  - {interface: lo, tunnel_depth: 9}\n"))
    assert found[0] == "interfaces[0].tunnel_depth" and found[1].endswith("got 9")
