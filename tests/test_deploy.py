"""The deployment files under deploy/: systemd units, Prometheus rules, Grafana dashboard.

The units are checked by systemd itself (`systemd-analyze verify` must be silent,
`systemd-analyze security --offline=yes` must score 3.0 or better), the rules by promtool
(`check rules`, and the unit tests in fanoutd.rules.test.yml), and every PromQL expression
in the rules and the dashboard may only name metrics fanoutd exports (fanoutd/metrics.py).
Tests needing systemd-analyze (Debian package systemd) or promtool (which
`scripts/install.sh --test` installs) skip, naming the missing tool, only where it is not
installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import programs
import pytest
import yaml
from unitfile import UNIT_DIR, section, single

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "fanoutd.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "fanoutd.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "fanoutd-dashboard.json"

INSTALLED_FANOUTD = "/opt/fanoutd/.venv/bin/fanoutd"
MAX_EXPOSURE = 3.0
UNITS = ("fanoutd.service", "fanoutd@.service")
# What systemd-analyze is run on: the plain unit, the template itself, and instances (one
# with a "-" in the interface name, which %i passes through verbatim).
VERIFY_TARGETS = ("fanoutd.service", "fanoutd@.service", "fanoutd@eth0.service",
                  "fanoutd@br-lan.service", "fanoutd-relay.service")
SECURITY_TARGETS = ("fanoutd.service", "fanoutd@eth0.service", "fanoutd-relay.service")
RELAY_UNIT = "fanoutd-relay.service"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PROMTOOL = programs.promtool()
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd)")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (scripts/install.sh --test)")


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


def describe(res: subprocess.CompletedProcess) -> str:
    return (f"$ {' '.join(res.args)}\nexit {res.returncode}\n--- stdout:\n{res.stdout}"
            f"--- stderr:\n{res.stderr}")


# --------------------------------------------------------------------------- metric names


def exported_metric_names() -> set[str]:
    """Sample names fanoutd serves: SLOT_COUNTERS (counters, so `_total`) and the rest."""
    from fanoutd.slotstats import PROXY_COUNTERS, PROXY_GAUGES, SLOT_COUNTERS
    return {f"{name}_total" for name, _key, _help in SLOT_COUNTERS + PROXY_COUNTERS} | {
        name for name, _key, _help in PROXY_GAUGES} | {
        "fanoutd_decode_errors_total", "fanoutd_ring_blocks_user", "fanoutd_workers_up",
        "fanoutd_build_info", "fanoutd_link_events_total", "fanoutd_link_up",
        "fanoutd_metrics_connections_dropped_total", "fanoutd_proxy_rejected_messages_total"}


def test_exported_names_are_what_the_collector_serves():
    """The list above is what a scrape really returns (so it cannot drift from metrics.py),
    besides the standard process_* metrics."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fanoutd.link import LinkWatch
    from fanoutd.metrics import DROP_REASONS, make_registry
    from fanoutd.slotstats import ProxyStats, StatsTable

    class Slot:
        index, stats = 0, StatsTable(1)[0]

    class Capture:
        interface, slots = "eth0", [Slot()]
        link_watch = LinkWatch("eth0", 1, True)

    class Source:
        captures = [Capture()]
        proxy_stats = ProxyStats()

        def refresh_kernel_stats(self) -> None:
            pass

    text = generate_latest(make_registry(Source(), dict.fromkeys(DROP_REASONS, 0))).decode()
    served = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples
              if not s.name.startswith("process_")}
    assert served == exported_metric_names()


def test_readme_metrics_table_lists_every_metric():
    table = (ROOT / "README.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert listed == exported_metric_names(), (
        f"not in the README: {exported_metric_names() - listed}, "
        f"not served: {listed - exported_metric_names()}")


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "atan2", "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w$.:])([A-Za-z_:][\w:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (matchers, by/without/on/ignoring lists) or parts of strings/durations."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries ($__rate_interval)
    text = _LABEL_LIST.sub(" ", text)
    return {m.group(1) for m in _WORD.finditer(text)
            if not m.group(2) and m.group(1).lower() not in PROMQL_KEYWORDS}


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (worker) (rate(a_total{interface=~"$interface"}[$__rate_interval]))',
     {"a_total"}),
    ('x / on (instance) group_left(version) y{job="j"} > bool 0.01', {"x", "y"}),
    ('up{job="fanoutd"} == 0 or on() absent(b_info)', {"up", "b_info"}),
    ("sum without (reason) (rate(e[5m])) / rate (p[5m] offset 1h) > 1e3", {"e", "p"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ("max_over_time(g[1h:1m])", {"g"}),
])
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


# --------------------------------------------------------------------------- systemd units


def service(unit: str) -> dict[str, list[str]]:
    return section(unit, "Service")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_settings(unit):
    s = service(unit)
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s",
        "Restart": "on-failure", "RestartSec": "2s", "TimeoutStopSec": "20s",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "SystemCallFilter": "@system-service",
        "UMask": "0077", "DevicePolicy": "closed", "ProtectProc": "invisible",
    }
    for key, value in expected.items():
        assert single(s, key) == value, key
    args = ("-c /etc/fanoutd/fanoutd.yaml" if unit == "fanoutd.service"
            else "-c /etc/fanoutd/%i.yaml --interface %i")
    assert single(s, "ExecStart") == f"{INSTALLED_FANOUTD} run {args}"
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert "78" in single(s, "RestartPreventExitStatus").split()
    bounding = set(single(s, "CapabilityBoundingSet").split())
    # CAP_KILL: the supervisor signals children running as another user; CAP_SETPCAP:
    # they empty their bounding set (tests/integration/test_unit_privileges.py runs the
    # daemon with exactly this set).
    assert bounding == {"CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SETPCAP"}
    assert set(single(s, "AmbientCapabilities").split()) <= bounding
    assert set(single(s, "RestrictAddressFamilies").split()) == {
        "AF_PACKET", "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # fanoutd reads /proc/net/route and /proc/buddyinfo, which ProcSubset=pid hides.
    assert "ProcSubset" not in s
    runtime = single(s, "RuntimeDirectory")
    assert runtime == ("fanoutd" if unit == "fanoutd.service" else "fanoutd-%i")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_gives_up_restarting(unit):
    """A daemon that cannot start (fanoutd@nosuch0: exit 69) must not restart forever:
    more starts than StartLimitBurst= within StartLimitIntervalSec= fail the unit."""
    s = section(unit, "Unit")
    burst = int(single(s, "StartLimitBurst"))
    interval = float(single(s, "StartLimitIntervalSec").removesuffix("s"))
    restart_sec = float(single(service(unit), "RestartSec").removesuffix("s"))
    assert 1 <= burst <= 10
    # Restarts RestartSec= apart must reach the burst inside the interval.
    assert burst * restart_sec < interval


def test_units_share_one_sandbox():
    """The template differs from the plain unit only in what names the instance."""
    per_instance = {"ExecStart", "ExecReload", "RuntimeDirectory"}
    plain, template = service("fanoutd.service"), service("fanoutd@.service")
    assert {k: v for k, v in plain.items() if k not in per_instance} == \
        {k: v for k, v in template.items() if k not in per_instance}


def test_relay_unit_settings():
    """The relay runs its shipped configuration, with no privilege, and does not retry
    an invalid configuration."""
    svc = service(RELAY_UNIT)
    assert svc["ExecStart"] == [f"{INSTALLED_FANOUTD} relay -c /etc/fanoutd/relay.yaml"]
    assert svc["DynamicUser"] == ["yes"] and svc["CapabilityBoundingSet"] == [""]
    assert svc["Restart"] == ["on-failure"] and svc["RestartPreventExitStatus"] == ["78"]
    assert "AF_PACKET" not in svc["RestrictAddressFamilies"][0]
    # it notifies (fanoutd.relay: READY, STATUS, WATCHDOG, STOPPING), as fanoutd does
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["WatchdogSec"] == ["30s"]


@pytest.fixture
def staged_units(tmp_path: Path) -> Path:
    """Copies of the units whose commands run an executable that exists here.

    systemd-analyze verify insists that ExecStart=/ExecReload= binaries exist;
    /opt/fanoutd/.venv is where a deployment installs fanoutd, not this checkout.
    """
    entry_point = Path(sys.executable).with_name("fanoutd")
    exe = entry_point if entry_point.is_file() else Path(sys.executable)
    for unit in (*UNITS, RELAY_UNIT):
        text = (UNIT_DIR / unit).read_text()
        assert INSTALLED_FANOUTD in text
        (tmp_path / unit).write_text(text.replace(INSTALLED_FANOUTD, str(exe)))
    return tmp_path


@needs_systemd_analyze
@pytest.mark.parametrize("target", VERIFY_TARGETS)
def test_systemd_verify_is_clean(staged_units, target):
    res = run(SYSTEMD_ANALYZE, "verify", "--man=no", staged_units / target)
    assert res.returncode == 0, describe(res)
    assert res.stderr == "", describe(res)  # warnings (unknown keys, bad values) go here


@needs_systemd_analyze
def test_systemd_verify_would_report_a_problem(staged_units):
    """verify really parses the staged file: a bad line in it is reported on stderr."""
    unit = staged_units / "fanoutd.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nNoSuchSetting=1\n"))
    res = run(SYSTEMD_ANALYZE, "verify", "--man=no", unit)
    assert "NoSuchSetting" in res.stderr, describe(res)


def exposure(output: str, unit: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+(?:\.\d+)?)",
                      output)
    assert match, f"no overall exposure line for {unit} in:\n{output}"
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("target", SECURITY_TARGETS)
def test_systemd_security_exposure(staged_units, target):
    res = run(SYSTEMD_ANALYZE, "security", "--offline=yes", staged_units / target)
    assert res.returncode == 0, describe(res)
    assert res.stderr == "", describe(res)
    score = exposure(res.stdout, target)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}\n{res.stdout}"


# --------------------------------------------------------------------------- Prometheus

REQUIRED_ALERTS = {"FanoutdDown", "FanoutdKernelDropsRising", "FanoutdKernelFreezesRising",
                   "FanoutdWorkerRestarting", "FanoutdWorkersDown", "FanoutdPublishDrops",
                   "FanoutdDecodeErrorsHigh", "FanoutdLinkDown"}
ALERT_LABELS = {  # labels each alert's annotations must name
    "FanoutdDown": {"instance"},
    "FanoutdWorkersDown": {"interface", "instance"},
    "FanoutdLinkDown": {"interface", "instance"},
    "FanoutdPublishDrops": {"instance"},  # the proxy's: one per daemon
}
# Prometheus itself adds `up` for every scrape target; FanoutdDown needs it.
PROMETHEUS_METRICS = {"up"}


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_check_rules():
    res = run(PROMTOOL, "check", "rules", RULES)
    assert res.returncode == 0, describe(res)


@needs_promtool
def test_promtool_rule_unit_tests():
    res = run(PROMTOOL, "test", "rules", RULE_TESTS, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, describe(res)


def test_rule_unit_tests_cover_the_key_alerts():
    doc = yaml.safe_load(RULE_TESTS.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]}
    assert {"FanoutdKernelDropsRising", "FanoutdWorkerRestarting", "FanoutdDown"} <= tested


def test_alert_rules_use_fanoutd_metrics_only():
    allowed = exported_metric_names() | PROMETHEUS_METRICS
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert names <= allowed, f"{rule['alert']}: unknown metrics {names - allowed}"


def test_alert_rules_are_labelled_and_annotated():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        notes = rule["annotations"]
        assert set(notes) >= {"summary", "description"}, rule["alert"]
        text = notes["summary"] + notes["description"]
        for label in ALERT_LABELS.get(rule["alert"], {"interface", "worker"}):
            assert f"$labels.{label}" in text, f"{rule['alert']} does not name {label}"


def test_every_alert_rule_has_its_own_comment():
    """Each rule is introduced by a comment just above it, so a comment that drifts onto
    the wrong rule leaves the rule it explains without one."""
    lines = RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\s*- alert: (\w+)", line)
        if match:
            assert i and lines[i - 1].lstrip().startswith("#"), \
                f"{match.group(1)} has no comment directly above it"


# --------------------------------------------------------------------------- Grafana


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries(dash: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and variable query."""
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for note in dash["annotations"]["list"]:
        if "expr" in note:
            yield f"annotation {note['name']!r}", note["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: expected label_values(), got {query!r}"
            yield f"variable {var['name']!r}", match.group(1)


def test_dashboard_structure():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("interface", "worker"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uses_fanoutd_metrics_only():
    exported = exported_metric_names()
    used: set[str] = set()
    for where, expr in dashboard_queries(dashboard()):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= exported, f"{where}: unknown metrics {names - exported}"
        used |= names
    assert used == exported, f"metrics on no panel: {exported - used}"


def test_dashboard_legends_name_real_labels():
    labels = {"instance", "job", "interface", "worker", "reason", "version", "event"}
    dash = dashboard()
    formats = [t.get("legendFormat", "") for p in all_panels(dash["panels"])
               for t in p.get("targets", [])]
    formats += [n.get("textFormat", "") for n in dash["annotations"]["list"]]
    for fmt in formats:
        assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", fmt)) <= labels, fmt


def substitute(expr: str) -> str:
    """A dashboard query as PromQL, with Grafana's variables replaced by what Grafana would
    substitute (every value selected)."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # $instance, ... inside =~ matchers


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """Every dashboard query is valid PromQL: promtool parses them as recording rules,
    with Grafana's variables replaced by what Grafana would substitute."""
    rules = [{"record": f"fanoutd_dashboard:query{i}", "expr": substitute(expr)}
             for i, (_where, expr) in enumerate(dashboard_queries(dashboard()))]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run(PROMTOOL, "check", "rules", path)
    assert res.returncode == 0, describe(res)


def test_count_panels_show_whole_numbers():
    """A stat or table panel that shows a count (a plain number, no rate) shows it whole:
    decimals 0, and increase(), which extrapolates to the edges of its range (3 restarts
    can read 3.07), rounded."""
    counts = []
    for panel in all_panels(dashboard()["panels"]):
        if panel["type"] not in ("stat", "table"):
            continue
        defaults = panel["fieldConfig"]["defaults"]
        exprs = [target["expr"] for target in panel["targets"]]
        if defaults.get("unit", "short") not in ("short", "none") or any(
                re.search(r"\b(i?rate|deriv)\(", e) for e in exprs):
            continue  # a ratio, a rate or a size: not a count
        counts.append(panel["title"])
        assert defaults.get("decimals") == 0, f"panel {panel['title']!r}: decimals 0"
        for expr in exprs:
            if "increase(" in expr:
                assert re.fullmatch(r"round\(.*\)", expr.strip(), re.S), \
                    f"panel {panel['title']!r}: round() the increase(): {expr}"
    assert {"Workers up", "Worker slots", "Worker restarts"} <= set(counts)


@needs_promtool
def test_restarts_stat_reads_whole_restarts(tmp_path):
    """Over a range in which a worker restarted 3 times the Worker restarts stat gives 3,
    where increase() alone gives 3 x 38.5 / 38 = 3.04 (it extends the last 38 minutes of
    samples by half an interval towards the range's end)."""
    panel = next(p for p in all_panels(dashboard()["panels"])
                 if p["type"] == "stat" and p["title"] == "Worker restarts")
    expr = substitute(panel["targets"][0]["expr"])
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{
                "series": 'fanoutd_worker_restarts_total{job="fanoutd",instance="a:9740",'
                          'interface="eth0",worker="0"}',
                "values": "0x5 1x10 2x10 3x10",  # 0 to 38m: restarts at 6, 17 and 28m
            }],
            "promql_expr_test": [{"expr": expr, "eval_time": "40m",
                                  "exp_samples": [{"labels": "{}", "value": 3}]}],
        }],
    }
    path = tmp_path / "restarts.test.yml"
    path.write_text(yaml.safe_dump(test))
    res = run(PROMTOOL, "test", "rules", path, cwd=tmp_path)
    assert res.returncode == 0, describe(res)
