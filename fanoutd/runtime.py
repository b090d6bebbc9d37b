"""What the daemon sets up around capture before it forks: the runtime directory (the
workers' socket to the proxy lives there), the metrics endpoint, and a word on endpoints opened
wider than loopback without protection. A problem here stops the start with one line and
an exit status (StartupError)."""

import ipaddress
import logging
import os
import shutil
import stat
import tempfile

from fanoutd import exits
from fanoutd.config import Config, MetricsConfig, parse_host_port
from fanoutd.metrics import StatsSource
from fanoutd.metrics_server import MetricsServer

log = logging.getLogger("fanoutd")

RUNTIME_MARK = "fanoutd.pid"  # in each runtime directory a daemon makes: its pid


class StartupError(Exception):
    """The daemon cannot start: the one line to log, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def make_runtime_dir(cfg: Config) -> str:
    """A new directory of this daemon's, in runtime_dir, $RUNTIME_DIRECTORY, /run/fanoutd
    (as root) or the temp dir; what killed daemons left there goes first."""
    base = (cfg.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
            or ("/run/fanoutd" if os.geteuid() == 0 else tempfile.gettempdir()))
    first = cfg.interfaces[0].interface
    try:
        os.makedirs(base, mode=0o755, exist_ok=True)
        remove_stale_runtime_dirs(base)
        path = tempfile.mkdtemp(prefix=f"{os.getpid()}-{first}-", dir=base)
        _mark_runtime_dir(path)
    except OSError as e:
        raise StartupError(f"runtime_dir: cannot create a directory in {base}: {e.strerror}",
                           exits.UNAVAILABLE) from None
    return path


def _mark_runtime_dir(path: str) -> None:
    """Say in the directory that this daemon made it (see remove_stale_runtime_dirs)."""
    with open(os.path.join(path, RUNTIME_MARK), "x") as f:
        f.write(f"{os.getpid()}\n")


def remove_stale_runtime_dirs(base: str) -> None:
    """Remove what daemons that were killed (no clean stop) left in base: directories
    PID-... that a fanoutd made (they are ours and hold RUNTIME_MARK naming that PID)
    and whose PID no longer runs. base may be shared (the temp dir): nothing else in it
    is touched, whatever its name."""
    for name in os.listdir(base):
        pid, sep, _ = name.partition("-")
        path = os.path.join(base, name)
        if not (sep and pid.isdigit()) or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            st = os.lstat(path)
            fd = os.open(os.path.join(path, RUNTIME_MARK), os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                marked = f.read(32).strip() == pid
        except (OSError, UnicodeDecodeError):
            continue
        if marked and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(path, ignore_errors=True)


def open_metrics(cfg: MetricsConfig, source: StatsSource) -> MetricsServer:
    """Listen for /metrics (served from `source`: the supervisor)."""
    try:
        return MetricsServer(cfg, source)
    except OSError as e:
        raise StartupError(f"metrics.listen: cannot listen on {cfg.listen}: {e.strerror}",
                           exits.UNAVAILABLE) from None


def metrics_url(cfg: MetricsConfig) -> str:
    scheme = "https" if cfg.tls_cert_file else "http"
    return f"{scheme}://{cfg.listen}/metrics"


def warn_if_exposed(cfg: Config) -> None:
    """Endpoints bind to loopback by default; say so when one is opened wider without
    the protection configured for it."""
    publish_cfg, metrics_cfg = cfg.publish, cfg.metrics
    scheme, _, rest = publish_cfg.endpoint.partition("://")
    if (scheme == "tcp" and not is_loopback(parse_host_port(rest)[0])
            and publish_cfg.curve.secret_key_file is None):
        log.warning("publishing on %s without CURVE: anyone who can reach it reads the "
                    "packet summaries (see publish.curve)", publish_cfg.endpoint)
    if (not is_loopback(parse_host_port(metrics_cfg.listen)[0])
            and metrics_cfg.tls_cert_file is None):
        log.warning("serving metrics on %s without TLS (see metrics.tls_cert_file)",
                    metrics_cfg.listen)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", a name or an interface: assume reachable from elsewhere
