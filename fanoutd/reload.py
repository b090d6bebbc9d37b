"""SIGHUP: what a new configuration changes (plan, a pure function of the configuration in
force and the new one) and applying it (apply_reload).

An invalid file, or one the daemon cannot take (privileges, the metrics listener), is
rejected with its reason and nothing changes. Otherwise everything is applied that can
be: a capture that cannot take its new settings goes on as before and the reload says it
is incomplete; the configuration in force is then the one that runs, so the same file
reloaded again is tried again rather than found unchanged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from fanoutd import handover, privileges
from fanoutd.config import CAPTURE_KEYS, CaptureConfig, Config, ConfigError
from fanoutd.metrics_server import MetricsServer
from fanoutd.runtime import StartupError

if TYPE_CHECKING:
    from fanoutd.supervisor import Supervisor

log = logging.getLogger("fanoutd")


class MetricsChange(enum.Enum):
    NONE = "none"
    RECONFIGURE = "reconfigure"  # the same listener: new TLS settings or credentials
    REBIND = "rebind"  # a new listen address: a new listener, or the reload is rejected


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload from one configuration to another does."""

    unchanged: bool  # the same configuration, and no capture waits to be tried again
    removed: tuple[str, ...] = ()  # interfaces no longer configured: drained, then closed
    added: tuple[str, ...] = ()  # interfaces newly configured: opened
    moved: tuple[str, ...] = ()  # captures put on new rings (new settings, or a retry)
    restart_proxy: bool = False
    metrics: MetricsChange = MetricsChange.NONE


def plan(old: Config, new: Config, retry: Collection[str] = ()) -> ReloadPlan:
    """What going from old (the configuration in force: its interfaces are the captures as
    they run) to new changes. retry: interfaces the last reload could not apply.

    A capture moves to new rings when its own settings changed, when it is to be tried
    again, or when its workers see a change (user, publish.format): workers only learn
    the daemon's settings when they are forked. The proxy restarts for any publish
    setting, the user, the status interval, or another list of interfaces (its stats
    report names them)."""
    if new == old and not retry:
        return ReloadPlan(unchanged=True)
    before = {c.interface: c for c in old.interfaces}
    wanted = {c.interface for c in new.interfaces}
    workers_see = (new.user, new.publish.format) != (old.user, old.publish.format)
    added, moved = [], []
    for capture in new.interfaces:
        running = before.get(capture.interface)
        if running is None:
            added.append(capture.interface)
        elif capture != running or capture.interface in retry or workers_see:
            moved.append(capture.interface)
    proxy = (new.publish, new.user, new.supervisor.status_interval_ms) != (
        old.publish, old.user, old.supervisor.status_interval_ms) or (
        [c.interface for c in new.interfaces] != [c.interface for c in old.interfaces])
    if new.metrics == old.metrics:
        metrics = MetricsChange.NONE
    elif new.metrics.listen == old.metrics.listen:
        metrics = MetricsChange.RECONFIGURE
    else:
        metrics = MetricsChange.REBIND
    return ReloadPlan(
        unchanged=False,
        removed=tuple(c.interface for c in old.interfaces if c.interface not in wanted),
        added=tuple(added), moved=tuple(moved), restart_proxy=proxy, metrics=metrics)


def in_force(new: Config, running: dict[str, CaptureConfig]) -> Config:
    """The configuration in force after a reload: new, with each interface's capture as it
    runs (a failed one keeps its previous settings, or is not there)."""
    return replace(new, interfaces=tuple(running[c.interface] for c in new.interfaces
                                         if c.interface in running))


def changes(old: Config, new: Config) -> list[str]:
    """The keys a reload changed, in their order in the file: top-level keys, and the keys
    of a capture whose running settings changed (also after a reload that could not move
    it); `interfaces` when an interface was added or removed."""
    changed = {f.name for f in fields(new) if getattr(new, f.name) != getattr(old, f.name)}
    before = {c.interface: c for c in old.interfaces}
    after = {c.interface: c for c in new.interfaces}
    changed.discard("interfaces")
    if before.keys() != after.keys():
        changed.add("interfaces")
    for name in before.keys() & after.keys():
        changed |= {f.name for f in fields(CaptureConfig)
                    if getattr(before[name], f.name) != getattr(after[name], f.name)}
    order = [*CAPTURE_KEYS, *(f.name for f in fields(Config))]  # as a file lists them
    return [name for name in order if name in changed]


def apply_reload(sup: Supervisor) -> None:
    """SIGHUP: read the configuration again. Invalid: say why and keep running as before.
    Valid: apply it without dropping capture."""
    try:
        cfg = sup.load_config()
    except ConfigError as e:
        for key, reason in e.problems:
            log.error("reload rejected, still running on the previous configuration: "
                      "%s: %s", key, reason)
        return
    old = sup.cfg
    todo = plan(old, cfg, sup.reload_failed)
    if todo.unchanged:
        log.info("reload: the configuration is unchanged")
        return
    problem = privileges.signalling_problem(cfg.user) or privileges.switch_problem(cfg.user)
    if problem:
        log.error("reload rejected, still running on the previous configuration: %s",
                  problem)
        return
    if not _swap_metrics(sup, cfg, todo.metrics):
        return
    logging.getLogger().setLevel(cfg.log.level.upper())
    sup.cfg = cfg  # what children forked from now on see
    for capture in [c for c in sup.captures if c.interface in todo.removed]:
        log.info("no longer capturing on %s", capture.interface)
        handover.retire_capture(sup, capture)
    by_name = {c.interface: c for c in sup.captures}
    failed = []  # interfaces whose capture could not take the new settings
    for capture_cfg in cfg.interfaces:
        name = capture_cfg.interface
        if name in todo.added:
            applied = _open_capture(sup, capture_cfg)
        elif name in todo.moved:
            applied = handover.replace_rings(sup, by_name[name], capture_cfg)
        else:
            applied = True
        if not applied:
            failed.append(name)
    sup.reload_failed = set(failed)
    for capture in sup.captures:
        capture.several = len(sup.captures) > 1
    if todo.restart_proxy and sup.proxy is not None:
        sup.stop_children([sup.proxy])
        sup.spawn_proxy()  # workers that dropped privileges reconnect by restarting
    sup.cfg = in_force(cfg, {c.interface: c.cfg for c in sup.captures})
    if failed:
        log.error("reload incomplete: the new capture settings of %s could not be "
                  "applied (see above), so %s as before; the rest of the configuration "
                  "is applied; another reload tries again", ", ".join(failed),
                  "it goes on" if len(failed) == 1 else "they go on")
        return
    log.info("reloaded the configuration (changed: %s)", ", ".join(changes(old, sup.cfg)))


def _open_capture(sup: Supervisor, cfg: CaptureConfig) -> bool:
    """Start capturing on an interface a reload added; False if it cannot."""
    try:
        capture = sup.open_capture(cfg)
    except StartupError as e:
        log.error("cannot capture on %s: %s", cfg.interface,
                  str(e).removeprefix(f"{cfg.interface}: "))
        return False
    sup.start_workers(capture)
    sup.health.capture_changed()
    return True


def _swap_metrics(sup: Supervisor, cfg: Config, change: MetricsChange) -> bool:
    """Serve metrics with cfg's settings; False (reload rejected) if it cannot."""
    if change is MetricsChange.NONE:
        return True
    assert sup.metrics is not None
    if change is MetricsChange.RECONFIGURE:
        sup.metrics.configure(cfg.metrics)  # same socket: new TLS and credentials
    elif change is MetricsChange.REBIND:
        try:
            server = MetricsServer(cfg.metrics, sup)
        except OSError as e:
            log.error("reload rejected, still running on the previous configuration: "
                      "metrics.listen: cannot listen on %s: %s", cfg.metrics.listen,
                      e.strerror)
            return False
        sup.metrics.close()
        sup.metrics = server
    return True
