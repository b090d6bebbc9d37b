"""The relay's pieces without a cluster: subjects and message ids, its configuration, and
what happens without nats-py."""

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest
import zmq.auth
from hypothesis import given
from hypothesis import strategies as st

from fanoutd import cli, jetstream
from fanoutd.config import ConfigError
from fanoutd.relay import _host_of
from fanoutd.relay_config import RelayConfig, load_relay_config


def test_subjects_escape_what_a_token_cannot_hold():
    assert jetstream.batch_subject("rack-7", "eth0", 3) == "fanoutd.rack-7.eth0.3"
    assert jetstream.batch_subject("a.example.org", "eth0.100", 0) == \
        "fanoutd.a%2Eexample%2Eorg.eth0%2E100.0"
    assert jetstream.subject_token("x*y>z%w v\tü") == "x%2Ay%3Ez%25w%20v%09ü"
    assert jetstream.message_id("a.b", "eth0", 1, 99, 5) == "a.b/eth0/1/99/5"


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_subject_tokens_are_one_to_one_and_valid(a, b):
    from urllib.parse import unquote

    for name in (a, b):
        token = jetstream.subject_token(name)
        assert token and not any(c in token for c in ".*>") and not any(
            c.isspace() for c in token)
        assert unquote(token) == name  # reversible, hence one-to-one
    if a != b:
        assert jetstream.subject_token(a) != jetstream.subject_token(b)


def test_servers_are_a_comma_list_or_repeated():
    assert jetstream.parse_servers("nats://a:1, nats://b:2,") == ["nats://a:1", "nats://b:2"]
    assert jetstream.parse_servers(["nats://a:1,nats://b:2", "nats://c:3"]) == \
        ["nats://a:1", "nats://b:2", "nats://c:3"]


def relay_args(*argv: str):
    return cli._parser().parse_args(["relay", *argv])


def test_relay_config_file_then_flags(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text("from: [tcp://s1:7440, tcp://s2:7440]\nnats: nats://n1:4222,nats://n2:4222\n"
                    "replicas: 3\nmax_in_flight: 8\n")
    cfg = load_relay_config(str(path), relay_args("--replicas", "2", "--nats", "nats://x:1"))
    assert cfg.sources == ("tcp://s1:7440", "tcp://s2:7440")
    assert cfg.nats == ("nats://x:1",) and cfg.replicas == 2 and cfg.max_in_flight == 8
    assert load_relay_config(None, relay_args()) == RelayConfig()
    shipped = load_relay_config("config/fanoutd-relay.yaml")
    assert shipped == RelayConfig()


def test_relay_config_problems_all_at_once(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text("surprise: 1\nstream: a.b\nmax_in_flight: 0\n")
    with pytest.raises(ConfigError) as info:
        load_relay_config(str(path), relay_args("--from", "udp://x:1", "--replicas", "9",
                                                "--metrics", "9741", "--nats", "http://n:1"))
    keys = sorted(key for key, _ in info.value.problems)
    assert keys == ["from (--from)", "max_in_flight", "metrics (--metrics)", "nats (--nats)",
                    "replicas (--replicas)", "stream", "surprise"], info.value.problems


def test_relay_curve_keys_are_checked(tmp_path):
    """The key files are read when the configuration is: a missing file, a public key
    where the secret one is needed, or a client key without the server's, named by key."""
    public, secret = zmq.auth.create_certificates(str(tmp_path), "relay")
    cfg = load_relay_config(None, relay_args("--curve-server-key", public,
                                             "--curve-client-cert", secret))
    assert (cfg.curve_server_key, cfg.curve_client_cert) == (public, secret)
    with pytest.raises(ConfigError) as info:
        load_relay_config(None, relay_args("--curve-server-key", str(tmp_path / "nope.key"),
                                           "--curve-client-cert", public))
    problems = dict(info.value.problems)
    assert "cannot read" in problems["curve_server_key (--curve-server-key)"], problems
    assert "no secret key" in problems["curve_client_cert (--curve-client-cert)"], problems
    with pytest.raises(ConfigError) as info:
        load_relay_config(None, relay_args("--curve-client-cert", secret))
    assert [key for key, _ in info.value.problems] == ["curve_client_cert (--curve-client-cert)"]


def test_relay_exits_78_on_a_bad_configuration(capsys):
    status = cli.main(["relay", "--replicas", "0"])
    err = capsys.readouterr().err
    assert status == 78 and err.startswith("fanoutd relay: replicas (--replicas): "), err


def test_a_sensor_without_a_name_is_named_by_its_endpoint():
    assert _host_of("tcp://sensor-a:7440") == "sensor-a"
    assert _host_of("tcp://[::1]:7440") == "::1"
    assert _host_of("ipc:///run/fanoutd/pub") == "/run/fanoutd/pub"


def test_without_nats_py_one_line_names_the_extra(tmp_path):
    """The daemon's and the ZeroMQ client's modules import without nats; the relay and
    JetStreamSubscriber say what to install."""
    blocker = tmp_path / "nats.py"
    blocker.write_text("raise ImportError('no nats here')\n")
    code = ("import fanoutd.client, fanoutd.supervisor, fanoutd.relay\n"
            "from fanoutd.client import JetStreamSubscriber\n"
            "try:\n    JetStreamSubscriber()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout == "needs nats-py: pip install 'fanoutd[nats]'\n", out.stderr
    relay = subprocess.run([sys.executable, "-m", "fanoutd", "relay", "--metrics",
                            "127.0.0.1:1"], env={"PYTHONPATH": str(tmp_path)},
                           capture_output=True, text=True, timeout=60, check=False)
    assert relay.returncode == 69
    assert "needs nats-py: pip install 'fanoutd[nats]'" in relay.stderr
    assert len(relay.stderr.splitlines()) == 1, relay.stderr


def test_tail_from_nats_usage_and_no_server(capsys):
    for argv in (["--durable", "x"], ["--nats", "nats://127.0.0.1:1", "--endpoint",
                                      "tcp://127.0.0.1:7440"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["tail", *argv])
        assert info.value.code == 2
    capsys.readouterr()
    status = cli.main(["tail", "--nats", "nats://127.0.0.1:1", "--timeout", "1"])
    err = capsys.readouterr().err
    assert status == 69 and "no answer from nats://127.0.0.1:1" in err, err


class _ElectingConsumer:
    """A pull subscription whose first info request goes unanswered (its consumer's
    leader is being elected), and whose second finds the leader."""

    def __init__(self) -> None:
        self.asked = 0

    async def consumer_info(self) -> SimpleNamespace:
        self.asked += 1
        if self.asked == 1:
            raise TimeoutError
        return SimpleNamespace(cluster=SimpleNamespace(leader="n2"))


def test_an_unanswered_consumer_info_is_asked_again_until_the_deadline():
    """A subscriber waits for its new consumer's leader by asking for the consumer's
    info; a request that times out meanwhile is asked again, not raised (four
    consumers made at once on one durable failed so, once, in a full test run)."""
    pytest.importorskip("nats")
    from fanoutd.jetstream_client import JetStreamSubscriber

    sub = JetStreamSubscriber.__new__(JetStreamSubscriber)  # no connection: _led alone
    sub._sub = _ElectingConsumer()
    asyncio.run(sub._led(5.0))
    assert sub._sub.asked == 2
