"""Fixtures for the integration tests: a private namespace, the daemon, a subscriber.

Every fixture cleans up in its teardown (pytest runs it also when the test fails):
daemons are killed before their namespace is deleted, namespaces are always deleted.
"""

import contextlib
import os
import shutil

import netlab
import pytest


def pytest_collection_modifyitems(config, items):
    """Skip (not fail) the integration tests where they cannot run: not root, no `ip`."""
    reason = None
    if os.geteuid() != 0:
        reason = "integration tests need root (network namespaces, AF_PACKET)"
    elif shutil.which("ip") is None:
        reason = "integration tests need iproute2's `ip`"
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def ns():
    """A fresh namespace with inj0 <-> cap0; deleted at teardown whatever happened."""
    with netlab.NetNS() as lab:
        yield lab


@pytest.fixture
def injector(ns):
    with netlab.Injector(ns) as inj:
        yield inj


@pytest.fixture
def start_daemon(ns):
    """Factory: start_daemon(workers=2, fanout="lb", ...) -> a ready netlab.Daemon.

    Every daemon started through it is SIGKILLed (with its children) at teardown.
    """
    with contextlib.ExitStack() as stack:
        def start(ready: bool = True, **kw) -> netlab.Daemon:
            wd = stack.enter_context(netlab.workdir())
            daemon = stack.enter_context(netlab.Daemon(ns, wd, **kw))
            if ready:
                daemon.wait_ready()
            return daemon
        yield start


@pytest.fixture
def subscribe():
    """Factory: subscribe(daemon) -> a netlab.Subscriber whose subscriptions are live."""
    with contextlib.ExitStack() as stack:
        def connect(daemon: netlab.Daemon) -> netlab.Subscriber:
            sub = stack.enter_context(netlab.Subscriber(daemon.endpoint))
            sub.wait_hello(timeout=10, detail=daemon.logs)
            return sub
        yield connect
