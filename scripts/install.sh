#!/usr/bin/env bash
# Install fanoutd on Debian 12: system packages, then a virtual environment at .venv in
# this checkout with fanoutd (editable) and its test tools. Run as root. Safe to repeat.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 77
fi

# libsystemd-dev + pkg-config + gcc: systemd-python builds against libsystemd; gcc and
# python3-dev also build fanoutd's C block decoder. libpcap0.8 compiles capture filters.
# tcpdump, netsniff-ng (trafgen), prometheus (promtool): used by tests and benchmarks;
# ethtool by `fanoutd doctor`.
packages=(python3-venv python3-dev gcc pkg-config libsystemd-dev libpcap0.8 iproute2
          procps tcpdump netsniff-ng prometheus ethtool)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "fanoutd installed: $(pwd)/.venv/bin/fanoutd"
