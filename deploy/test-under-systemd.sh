#!/usr/bin/env bash
# Boot Debian 12 with systemd as PID 1 in a container (systemd-nspawn), install fanoutd in
# it as README.md says ("Installing it as a service"), and check the shipped units end to
# end: start and READY, STATUS=, metrics, the workers' privileges, reload, a hung worker,
# the interface re-created, the watchdog, stop, and the fanoutd@ template.
#
#   deploy/test-under-systemd.sh [--keep] [--cache DIR] [--rebuild]
#
#   --keep       leave the container's root directory (printed at the end) for debugging
#   --cache DIR  where the pristine Debian root and the apt/pip download caches live
#                (default: $FANOUTD_CT_CACHE or /var/cache/fanoutd-ct)
#   --rebuild    build the cached Debian root again with debootstrap
#
# Run as root on a Debian 12 host; installs debootstrap and systemd-container itself. The
# committed HEAD of this checkout is what gets tested, not the working tree. Only the
# install step, before boot, uses the host's network (apt, pip); the booted container has
# a private network namespace: capture and every injected frame stay on a veth pair inside
# it. Exit status: 0 every check passed, 1 a check failed, 2 usage, 3 set-up failed.

# The poll conditions are small functions that wait_until calls by name.
# shellcheck disable=SC2317
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FANOUTD_CT_CACHE:-/var/cache/fanoutd-ct}
mirror=${FANOUTD_CT_MIRROR:-http://deb.debian.org/debian}
keep=0
rebuild=0

# What the cached root holds; a change here makes the next run rebuild it.
base_packages=systemd,systemd-sysv,dbus,iproute2,python3,git,ca-certificates
base_id="bookworm minbase $base_packages"

ct_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
conf=/etc/fanoutd/fanoutd.yaml   # inside the container
workdir=""                        # this run's directory: the root copy and logs
root=""                           # the container's root directory, on the host
nspawn_pid=""                     # the booted systemd-nspawn
ct_pid=""                         # the container's PID 1, as the host sees it
started=$SECONDS

usage() {
    cat <<'EOF'
usage: deploy/test-under-systemd.sh [--keep] [--cache DIR] [--rebuild]
  --keep       leave the container's root directory for debugging
  --cache DIR  the cached Debian root and apt/pip downloads (default: /var/cache/fanoutd-ct)
  --rebuild    build the cached Debian root again with debootstrap
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --keep) keep=1 ;;
        --rebuild) rebuild=1 ;;
        --cache) [ $# -ge 2 ] || { usage >&2; exit 2; }; cache=$2; shift ;;
        --cache=*) cache=${1#--cache=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "test-under-systemd: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf '== [%3ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { echo "test-under-systemd: $*" >&2; exit 3; }

# ---------------------------------------------------------------------------------------
# Clean-up, on every exit path: power the container off, then remove this run's root.

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        say "powering the container off"
        [ -n "$ct_pid" ] && timeout 10 nsenter --target "$ct_pid" --all \
            env -i PATH="$ct_path" systemctl poweroff >/dev/null 2>&1
        wait_gone "$nspawn_pid" 30 || {
            # SIGTERM asks nspawn to shut the container down; SIGKILL if even that hangs.
            kill -TERM "$nspawn_pid" 2>/dev/null
            wait_gone "$nspawn_pid" 15 || kill -KILL "$nspawn_pid" 2>/dev/null
        }
        wait "$nspawn_pid" 2>/dev/null
    fi
    if [ -n "$workdir" ] && [ -d "$workdir" ]; then
        if grep -qF " $workdir/" /proc/self/mountinfo; then
            echo "test-under-systemd: something is still mounted under $workdir; not removing it" >&2
        elif [ "$keep" = 1 ]; then
            say "kept $root (boot it: systemd-nspawn --boot --keep-unit --register=no --private-network -D $root)"
        else
            rm -rf --one-file-system "$workdir"
        fi
    fi
    say "total $((SECONDS - started)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_gone PID SECONDS: 0 once the process is gone, 1 if it is still there at the deadline.
wait_gone() {
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# wait_until SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds; 1 at the deadline.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------
# Set-up: host tools, the cached Debian root, this run's copy, fanoutd installed in it.

host_tools() {
    [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, systemd-nspawn)"
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    { command -v nsenter && command -v flock; } >/dev/null || missing+=(util-linux)
    command -v git >/dev/null || missing+=(git)
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The pristine root is built once into the cache and only ever copied: runs never boot it.
cached_base() {
    local base=$cache/bookworm done_file=$cache/bookworm.done
    mkdir -p "$cache"
    exec 9>"$cache/lock"
    flock 9  # one build at a time
    if [ "$rebuild" = 1 ] || [ ! -d "$base" ] || [ "$(cat "$done_file" 2>/dev/null)" != "$base_id" ]; then
        say "building the Debian 12 root with debootstrap (once; cached in $base)"
        rm -f "$done_file"
        rm -rf --one-file-system "$base" "$base.new"
        debootstrap --variant=minbase --include="$base_packages" bookworm "$base.new" \
            "$mirror" >"$cache/debootstrap.log" 2>&1 \
            || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap failed (log: $cache/debootstrap.log)"; }
        rm -f "$base.new"/var/cache/apt/archives/*.deb  # every run copies the root
        mv "$base.new" "$base"
        printf '%s\n' "$base_id" >"$done_file"
    else
        say "reusing the cached Debian 12 root $base"
    fi
    flock -u 9
}

make_root() {
    workdir=$(mktemp -d "$cache/run.XXXXXX")
    root=$workdir/root
    cp -a --reflink=auto "$cache/bookworm" "$root"
    echo fanoutd-ct >"$root/etc/hostname"
    # apt and pip inside trust what the host trusts (e.g. a TLS-inspecting proxy's CA).
    local crt
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -f "$crt" ] && cp "$crt" "$root/usr/local/share/ca-certificates/"
    done
    probe_script >"$root/root/ct-probe.py"
}

# README's steps, run in the container before it boots, with the host's network. The
# checkout is a clone of this repository's committed HEAD (through a bundle: the
# container cannot see the host's repository).
install_fanoutd() {
    local sha
    sha=$(git -C "$repo" rev-parse HEAD)
    if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
        say "note: uncommitted changes are not tested; the container gets HEAD ${sha:0:12}"
    fi
    git -C "$repo" bundle create "$root/root/fanoutd.bundle" HEAD 2>/dev/null
    mkdir -p "$cache/apt-archives/partial" "$cache/pip"
    local env_args=() v
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [ -n "${!v:-}" ] && env_args+=("--setenv=$v=${!v}")
    done
    say "installing fanoutd ${sha:0:12} in the container (apt, pip; log: $workdir/install.log)"
    # The download caches are bind-mounted so reruns do not fetch again; the install
    # itself runs in full every time.
    if ! systemd-nspawn -q --keep-unit --register=no -D "$root" --pipe \
            --bind="$cache/apt-archives:/var/cache/apt/archives" \
            --bind="$cache/pip:/root/.cache/pip" "${env_args[@]}" \
            bash -euxc '
                update-ca-certificates >/dev/null
                git -c advice.detachedHead=false clone -q /root/fanoutd.bundle /opt/fanoutd
                rm /root/fanoutd.bundle
                cd /opt/fanoutd
                ./scripts/install.sh
                install -D -m 0644 config/fanoutd.yaml /etc/fanoutd/fanoutd.yaml
                install -m 0644 deploy/systemd/fanoutd.service /etc/systemd/system/
                install -m 0644 deploy/systemd/fanoutd@.service /etc/systemd/system/
            ' </dev/null >"$workdir/install.log" 2>&1; then
        tail -n 30 "$workdir/install.log" >&2
        die "installing fanoutd in the container failed (log: $workdir/install.log)"
    fi
}

# ---------------------------------------------------------------------------------------
# The booted container.

boot() {
    say "booting the container (systemd as PID 1, private network)"
    setsid systemd-nspawn -q --boot --keep-unit --register=no --private-network \
        -D "$root" --machine="fanoutd-ct-$$" </dev/null >"$workdir/console.log" 2>&1 &
    nspawn_pid=$!
    gone() { ! kill -0 "$nspawn_pid" 2>/dev/null; }
    if ! wait_until 30 find_pid1 || gone; then
        tail -n 20 "$workdir/console.log" >&2
        die "the container's systemd did not start"
    fi
    # Capture must never reach the host's interfaces: a network namespace of its own,
    # with nothing in it but lo.
    [ "$(readlink "/proc/$ct_pid/ns/net")" != "$(readlink /proc/self/ns/net)" ] \
        || die "the container shares the host's network namespace"
    local links
    links=$(ct ip -o link show | awk -F': ' '{print $2}' | paste -sd ' ')
    [ "$links" = lo ] || die "the container's network has more than lo: $links"
    local state=""
    booted() {
        state=$(ct systemctl is-system-running 2>/dev/null) || true
        [ "$state" = running ] || [ "$state" = degraded ] || gone
    }
    if ! wait_until 120 booted || gone; then
        tail -n 20 "$workdir/console.log" >&2
        die "boot did not finish: system is '$state'"
    fi
    say "booted: system is $state"
    if [ "$state" = degraded ]; then ct systemctl --failed --no-legend | sed 's/^/   failed unit: /'; fi
    return 0
}

# The container's PID 1 is nspawn's child once it has exec'd systemd (0 also once nspawn
# is gone: nothing to wait for).
find_pid1() {
    kill -0 "$nspawn_pid" 2>/dev/null || return 0
    local child children=()
    read -ra children <"/proc/$nspawn_pid/task/$nspawn_pid/children" 2>/dev/null || true
    for child in "${children[@]}"; do
        if [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ]; then
            ct_pid=$child
            return 0
        fi
    done
    return 1
}

# ct COMMAND...: run COMMAND in the container (all its namespaces, a clean environment).
ct() {
    nsenter --target "$ct_pid" --all \
        env -i PATH="$ct_path" LANG=C.UTF-8 SYSTEMD_COLORS=0 SYSTEMD_PAGER= "$@"
}

probe() { ct python3 /root/ct-probe.py "$@"; }

# ct_signal SIG PID: bash's own kill, as a minimal Debian has no /bin/kill (procps).
# shellcheck disable=SC2016  # $1 and $2 are the inner bash's arguments
ct_signal() { ct bash -c 'kill -s "$1" "$2"' ct_signal "$1" "$2"; }

# A veth pair: frames written to inj0 arrive on cap0. IPv6 off before they come up, so
# neither sends anything on its own (no address, no router or neighbour solicitation).
make_veth() {
    ct ip link add inj0 type veth peer name cap0
    ct sh -c 'echo 1 >/proc/sys/net/ipv6/conf/inj0/disable_ipv6 &&
              echo 1 >/proc/sys/net/ipv6/conf/cap0/disable_ipv6'
    ct ip link set inj0 up
    ct ip link set cap0 up
}

# write_config FILE WORKERS [PORT_OFFSET]: the shipped configuration with capture on cap0,
# a short heartbeat timeout (so a hung worker is caught in about a second) and a STATUS=
# line every second; PORT_OFFSET moves the publish and metrics ports (a second daemon).
write_config() {
    local file=$root/etc/fanoutd/$1 off=${3:-0}
    sed -e 's/^interface: .*/interface: cap0/' \
        -e "s/^workers: .*/workers: $2/" \
        -e 's/^\(  heartbeat_timeout_ms:\) .*/\1 1000/' \
        -e 's/^\(  status_interval_ms:\) .*/\1 1000/' \
        -e "s|^\(  endpoint: tcp://127.0.0.1:\)7440$|\1$((7440 + off))|" \
        -e "s/^\(  listen: 127.0.0.1:\)9740$/\1$((9740 + off))/" \
        "$root/opt/fanoutd/config/fanoutd.yaml" >"$file"
    # The edits rely on the shipped file's layout: make sure each one took.
    local want
    for want in '^interface: cap0$' "^workers: $2\$" '^  heartbeat_timeout_ms: 1000$' \
                '^  status_interval_ms: 1000$' "^  endpoint: tcp://127.0.0.1:$((7440 + off))\$" \
                "^  listen: 127.0.0.1:$((9740 + off))\$"; do
        grep -q "$want" "$file" || die "config/fanoutd.yaml changed layout: cannot set /$want/ in $file"
    done
}

# The Python the checks run inside the container (its own python3, standard library only).
probe_script() {
    cat <<'EOF'
"""Probes for deploy/test-under-systemd.sh, run inside the container."""
import os
import pwd
import re
import socket
import struct
import sys
import urllib.request


def inject(ifname, count):
    """count IPv4/UDP frames out of ifname, spread over 1000 source ports and 200
    source addresses (so fanout hashes them over every worker)."""
    def checksum(b):
        s = sum(struct.unpack(f"!{len(b) // 2}H", b))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    payload = b"fanoutd under systemd"
    for i in range(int(count)):
        udp = struct.pack("!HHHH", 10000 + i % 1000, 9, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                         bytes([198, 18, 0, 1 + i % 200]), bytes([198, 19, 0, 1]))
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        eth = bytes.fromhex("020000000002" "020000000001" "0800")  # dst, src, IPv4
        s.send(eth + ip + udp)


def packets(port, iface):
    """The sum of fanoutd_kernel_packets_total over iface's workers; -1 if unreachable."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        print(-1)
        return
    total = 0.0
    for line in text.decode().splitlines():
        m = re.match(r"fanoutd_kernel_packets_total\{(.*)\} (\S+)$", line)
        if m and f'interface="{iface}"' in m.group(1):
            total += float(m.group(2))
    print(int(total))


def processes():
    """(pid, comm, cmdline) of every process."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        yield int(pid), comm, cmdline


def pids(name):
    """PIDs of the processes called name (comm)."""
    for pid, comm, _ in processes():
        if comm == name:
            print(pid)


def leftovers():
    """Any fanoutd process: its name, or the venv's fanoutd in its command line."""
    for pid, comm, cmdline in processes():
        if comm.startswith(("fanoutd", "fd-")) or "/opt/fanoutd/" in cmdline:
            print(pid, comm, cmdline)


def privileges(scope="process"):
    """Workers and the proxy: no capability in any set, an empty bounding set,
    no_new_privs, every uid and gid those of the fanoutd account (which install.sh made).
    scope "process": /proc/PID/status (the main thread); "threads": every thread. Prints
    the problems, one line per process and finding with the number of threads it holds
    for; exit 1 if any."""
    account = pwd.getpwnam("fanoutd")
    ids = {"Uid": str(account.pw_uid), "Gid": str(account.pw_gid)}
    problems, seen = {}, 0
    for pid, comm, _ in processes():
        if not re.fullmatch(r"fanoutd-(w\d+|proxy)|fd-.+-w\d+", comm):
            continue
        tids = os.listdir(f"/proc/{pid}/task") if scope == "threads" else [str(pid)]
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    st = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            except OSError:
                continue
            seen += 1
            found = [f"{key}={st[key]}" for key in ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                     "CapAmb") if int(st[key], 16) != 0]
            if st.get("NoNewPrivs") != "1":
                found.append(f"NoNewPrivs={st.get('NoNewPrivs')}")
            found += [f"{key}={' '.join(st[key].split())}" for key in ("Uid", "Gid")
                      if set(st[key].split()) != {ids[key]}]
            for finding in found:
                key = f"{comm} (pid {pid}): {finding}"
                problems[key] = problems.get(key, 0) + 1
    if not seen:
        problems["no worker or proxy process found"] = 0
    for problem, count in problems.items():
        print(f"{problem} in {count} thread(s)" if scope == "threads" and count else problem)
    if not problems:
        print(f"{seen} {'threads' if scope == 'threads' else 'processes'} checked")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
EOF
}

# ---------------------------------------------------------------------------------------
# Unit state and the journal.

declare -A P  # the properties load_props read last

load_props() {
    P=()
    local k v
    while IFS='=' read -r k v; do
        P[$k]=$v
    done < <(ct systemctl show -p ActiveState,SubState,Result,MainPID,NRestarts,StatusText \
                                 -p ExecMainCode,ExecMainStatus,WatchdogUSec "$1")
}

state() { echo "${P[ActiveState]:-?}/${P[SubState]:-?}"; }

# Parse P[StatusText], "U/T workers up on IFACE, R packets/s, D dropped", into st_*.
parse_status() {
    [[ ${P[StatusText]:-} =~ ^([0-9]+)/([0-9]+)\ workers\ up\ on\ ([^,]+),\ ([0-9]+)\ packets/s,\ ([0-9]+)\ dropped$ ]] || return 1
    st_up=${BASH_REMATCH[1]} st_total=${BASH_REMATCH[2]} st_iface=${BASH_REMATCH[3]}
    st_rate=${BASH_REMATCH[4]}
}

# all_up UNIT [N]: active (running) and STATUS= says every worker (N of them) is up on cap0.
all_up() {
    load_props "$1"
    [ "$(state)" = active/running ] && parse_status && [ "$st_iface" = cap0 ] \
        && [ "$st_up" = "$st_total" ] && [ "$st_total" -gt 0 ] && { [ -z "${2:-}" ] || [ "$st_total" = "$2" ]; }
}

cursor() { ct journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'; }

# journal_since CURSOR UNIT...: the units' journal after CURSOR.
journal_since() {
    local c=$1 args=() u
    shift
    for u in "$@"; do args+=(-u "$u"); done
    ct journalctl --no-pager -q --after-cursor="$c" "${args[@]}"
}

# journal_has CURSOR UNIT REGEX (captured first: grep -q would cut journalctl's pipe)
journal_has() {
    local out
    out=$(journal_since "$1" "$2")
    grep -qE -- "$3" <<<"$out"
}

# systemd's own words on why a job failed, in UNIT's journal since CURSOR.
job_failure() {
    local out
    out=$(journal_since "$1" "$2")
    grep -m1 -E 'Failed to|Failed at|code=(exited|killed|dumped)' <<<"$out" | sed 's/^.*]: //' || true
}

# What must never be in fanoutd's journal: a traceback, or a signal or call refused.
crash_re='Traceback|PermissionError|[Pp]ermission denied'

# crash_line CURSOR UNIT: the first such line in UNIT's journal since CURSOR (the
# exception rather than the Traceback header when there is one).
crash_line() {
    local out
    out=$(journal_since "$1" "$2")
    grep -m1 -E 'PermissionError|[Pp]ermission denied' <<<"$out" \
        || grep -m1 -E "$crash_re" <<<"$out" || true
}

# ---------------------------------------------------------------------------------------
# Checks. Each returns 0 with a summary in `what`, or 1 with the reason in `why`.

failed=0
summary=()
bad() { why=$*; return 1; }

# run_check NAME FUNCTION UNIT: a PASS/FAIL line; on failure UNIT's journal since the check
# began (UNIT "-": none).
run_check() {
    local name=$1 fn=$2 unit=$3 mark
    what="" why=""
    mark=$(cursor)
    if "$fn"; then
        printf 'PASS %-19s %s\n' "$name" "$what"
        summary+=("PASS $name")
    else
        printf 'FAIL %-19s %s\n' "$name" "$why"
        summary+=("FAIL $name")
        failed=$((failed + 1))
        if [ "$unit" != - ]; then
            local log
            log=$(journal_since "$mark" "$unit" | tail -n 40)
            echo "     journalctl -u $unit, since this check began (last 40 lines):"
            printf '%s\n' "${log:-(no entries)}" | sed 's/^/       | /'
        fi
    fi
}

# Each check after `start` needs fanoutd running; a crash in the previous check must not
# hide what the next one would find.
ensure_running() {
    all_up fanoutd && return 0
    echo "     (fanoutd is $(state) after the previous check: restarting it for this one)"
    ct systemctl reset-failed fanoutd 2>/dev/null || true
    ct timeout 60 systemctl restart fanoutd || bad "precondition: systemctl restart fanoutd failed" || return 1
    wait_until 15 all_up fanoutd || bad "precondition: fanoutd not running after a restart: $(state), '${P[StatusText]:-}'"
}

check_start() {
    write_config fanoutd.yaml 2
    ct systemctl daemon-reload
    local mark rc=0
    mark=$(cursor)
    ct timeout 60 systemctl start fanoutd 2>/dev/null || rc=$?
    [ "$rc" = 0 ] || bad "systemctl start fanoutd exited $rc: $(job_failure "$mark" fanoutd)" || return 1
    # Type=notify: start returns once READY=1 came, and READY's STATUS= has every worker up.
    load_props fanoutd
    [ "$(state)" = active/running ] || bad "not active (running) but $(state)" || return 1
    all_up fanoutd 2 || bad "READY but STATUS= is '${P[StatusText]}', not 2/2 workers up on cap0" || return 1
    journal_has "$mark" fanoutd 'capturing on cap0: 2 workers' \
        || bad "the journal lacks 'capturing on cap0: 2 workers'" || return 1
    what="active (running), READY with '${P[StatusText]}'"
}

check_status() {
    ensure_running || return 1
    probe inject inj0 2000 || bad "injecting frames on inj0 failed" || return 1
    # STATUS= comes every status_interval_ms (1 s here) with the rate since the last one.
    moved() { load_props fanoutd; parse_status && [ "$st_rate" -gt 0 ]; }
    wait_until 10 moved || bad "no STATUS= with a packet rate above 0 within 10 s after 2000 frames; last: '${P[StatusText]:-}'" || return 1
    what="'${P[StatusText]}' after 2000 frames"
}

check_metrics() {
    ensure_running || return 1
    local before after=""
    before=$(probe packets 9740 cap0)
    [ "$before" -ge 0 ] || bad "cannot scrape 127.0.0.1:9740/metrics" || return 1
    probe inject inj0 1000 || bad "injecting frames on inj0 failed" || return 1
    grown() { after=$(probe packets 9740 cap0); [ "$after" -ge $((before + 1000)) ]; }
    wait_until 10 grown || bad "fanoutd_kernel_packets_total{interface=cap0} $before -> $after after 1000 frames" || return 1
    what="fanoutd_kernel_packets_total{interface=\"cap0\"} $before -> $after after 1000 frames"
}

# /proc/PID/status of every worker and of the proxy (that is, their main threads).
check_privileges() {
    ensure_running || return 1
    local out
    out=$(probe privileges process 2>&1) || bad "$(paste -sd ';' <<<"$out")" || return 1
    what="workers and proxy: CapInh/Prm/Eff/Bnd/Amb 0, NoNewPrivs 1, uid and gid fanoutd's ($out)"
}

# The same in every thread (ZeroMQ's included), as README.md promises: capabilities and
# the bounding set are per thread.
check_privileges_threads() {
    ensure_running || return 1
    local out
    out=$(probe privileges threads 2>&1) || bad "$(paste -sd ';' <<<"$out")" || return 1
    what="every thread of the workers and proxy: as above ($out)"
}

check_reload() {
    ensure_running || return 1
    load_props fanoutd
    local main=${P[MainPID]} restarts=${P[NRestarts]} mark rc=0
    mark=$(cursor)
    sed -i 's/^workers: 2$/workers: 3/' "$root$conf"
    grep -q '^workers: 3$' "$root$conf" || bad "could not set workers: 3" || return 1
    ct timeout 30 systemctl reload fanoutd 2>/dev/null || rc=$?
    [ "$rc" = 0 ] || bad "systemctl reload exited $rc: $(job_failure "$mark" fanoutd)" || return 1
    # Settled: 3/3 up after the reload was logged, or the supervisor is gone.
    settled() {
        load_props fanoutd
        [ "${P[MainPID]}" != "$main" ] && return 0
        all_up fanoutd 3 && journal_has "$mark" fanoutd 'reloaded the configuration'
    }
    wait_until 20 settled
    [ "${P[MainPID]}" = "$main" ] || bad "the supervisor did not survive: MainPID $main -> ${P[MainPID]}, $(state); $(crash_line "$mark" fanoutd)" || return 1
    [ "${P[NRestarts]}" = "$restarts" ] || bad "NRestarts $restarts -> ${P[NRestarts]}" || return 1
    journal_has "$mark" fanoutd 'reloaded the configuration' || bad "the journal never says 'reloaded the configuration'" || return 1
    all_up fanoutd 3 || bad "not 3/3 workers up 20 s after the reload: '${P[StatusText]}'" || return 1
    local crash
    crash=$(crash_line "$mark" fanoutd)
    [ -z "$crash" ] || bad "the journal has: $crash" || return 1
    what="same MainPID $main, NRestarts $restarts, 'reloaded the configuration', '${P[StatusText]}'"
}

check_reload_invalid() {
    ensure_running || return 1
    load_props fanoutd
    local main=${P[MainPID]} restarts=${P[NRestarts]} mark rc=0
    mark=$(cursor)
    cp "$root$conf" "$workdir/good.yaml"
    sed -i 's/^workers: .*/workers: 0/' "$root$conf"
    ct timeout 30 systemctl reload fanoutd 2>/dev/null || rc=$?
    cp "$workdir/good.yaml" "$root$conf"
    [ "$rc" != 0 ] || bad "systemctl reload succeeded with workers: 0" || return 1
    all_up fanoutd || bad "not running after the rejected reload: $(state), '${P[StatusText]}'" || return 1
    [ "${P[MainPID]}" = "$main" ] || bad "MainPID $main -> ${P[MainPID]}" || return 1
    [ "${P[NRestarts]}" = "$restarts" ] || bad "NRestarts $restarts -> ${P[NRestarts]}" || return 1
    local reason
    reason=$(journal_since "$mark" fanoutd | grep -m1 -E 'workers: must be' || true)
    [ -n "$reason" ] || bad "the journal does not say why the file was rejected" || return 1
    what="systemctl reload exited $rc, still running (MainPID $main); journal: ${reason#*: }"
}

check_hung_worker() {
    ensure_running || return 1
    load_props fanoutd
    local main=${P[MainPID]} restarts=${P[NRestarts]} total=$st_total mark old new=""
    old=$(probe pids fanoutd-w0)
    [ -n "$old" ] && [ "$old" = "${old%%[!0-9]*}" ] || bad "want one fanoutd-w0 process, found '${old//$'\n'/ }'" || return 1
    mark=$(cursor)
    ct_signal STOP "$old" || bad "cannot SIGSTOP fanoutd-w0 (pid $old)" || return 1
    # Settled: a new fanoutd-w0 runs and every worker is up, or the supervisor is gone.
    settled() {
        load_props fanoutd
        [ "${P[MainPID]}" != "$main" ] && return 0
        new=$(probe pids fanoutd-w0)
        [ -n "$new" ] && [ "$new" != "$old" ] && all_up fanoutd "$total"
    }
    wait_until 20 settled
    ct_signal CONT "$old" 2>/dev/null || true  # if it is still there, do not leave it stopped
    [ "${P[MainPID]}" = "$main" ] || bad "the supervisor did not survive: MainPID $main -> ${P[MainPID]}, $(state); $(crash_line "$mark" fanoutd)" || return 1
    [ "${P[NRestarts]}" = "$restarts" ] || bad "NRestarts $restarts -> ${P[NRestarts]}" || return 1
    [ -n "$new" ] && [ "$new" != "$old" ] || bad "fanoutd-w0 (pid $old) was not replaced within 20 s" || return 1
    journal_has "$mark" fanoutd 'fanoutd-w0 has not heartbeaten' || bad "the journal does not say fanoutd-w0 stopped heartbeating" || return 1
    local crash
    crash=$(crash_line "$mark" fanoutd)
    [ -z "$crash" ] || bad "the journal has: $crash" || return 1
    what="SIGSTOPped fanoutd-w0 (pid $old) replaced by pid $new, MainPID $main unchanged, '${P[StatusText]}'"
}

check_link() {
    ensure_running || return 1
    load_props fanoutd
    local main=${P[MainPID]} restarts=${P[NRestarts]} total=$st_total mark before after=""
    mark=$(cursor)
    ct ip link del inj0  # takes its peer cap0 with it
    wait_until 10 journal_has "$mark" fanoutd 'cap0 was deleted' \
        || bad "the journal does not say cap0 was deleted" || return 1
    make_veth
    # Settled: capture announced again on the new cap0, or the supervisor is gone.
    settled() {
        load_props fanoutd
        [ "${P[MainPID]}" != "$main" ] && return 0
        journal_has "$mark" fanoutd 'capturing on cap0' && all_up fanoutd "$total"
    }
    wait_until 20 settled
    [ "${P[MainPID]}" = "$main" ] || bad "the supervisor did not survive: MainPID $main -> ${P[MainPID]}, $(state); $(crash_line "$mark" fanoutd)" || return 1
    [ "${P[NRestarts]}" = "$restarts" ] || bad "NRestarts $restarts -> ${P[NRestarts]}" || return 1
    journal_has "$mark" fanoutd 'cap0 exists again' || bad "the journal does not say cap0 exists again" || return 1
    all_up fanoutd "$total" && journal_has "$mark" fanoutd 'capturing on cap0' \
        || bad "capture not announced again on the new cap0 within 20 s: '${P[StatusText]}'" || return 1
    before=$(probe packets 9740 cap0)
    probe inject inj0 500 || bad "injecting frames on inj0 failed" || return 1
    grown() { after=$(probe packets 9740 cap0); [ "$after" -ge $((before + 500)) ]; }
    wait_until 10 grown || bad "no capture on the new cap0: fanoutd_kernel_packets_total $before -> $after after 500 frames" || return 1
    local crash
    crash=$(crash_line "$mark" fanoutd)
    [ -z "$crash" ] || bad "the journal has: $crash" || return 1
    what="logged deleted and back, MainPID $main unchanged, capture resumed ($before -> $after packets)"
}

check_watchdog() {
    ensure_running || return 1
    local dropin=$root/etc/systemd/system/fanoutd.service.d
    mkdir -p "$dropin"
    printf '[Service]\nWatchdogSec=4s\n' >"$dropin/watchdog.conf"
    ct systemctl daemon-reload
    ct timeout 60 systemctl restart fanoutd || true
    wait_until 15 all_up fanoutd
    local ok=0
    watchdog_fires && ok=1
    # Back to the shipped unit for the checks after this one.
    rm -r "$dropin"
    ct systemctl daemon-reload
    ct timeout 60 systemctl restart fanoutd || true
    [ "$ok" = 1 ]
}

watchdog_fires() {
    all_up fanoutd || bad "not running with the WatchdogSec=4s drop-in: $(state), '${P[StatusText]}'" || return 1
    [ "${P[WatchdogUSec]}" = 4s ] || bad "WatchdogUSec=${P[WatchdogUSec]}, not the drop-in's 4s" || return 1
    local main=${P[MainPID]} restarts=${P[NRestarts]} mark
    # First, fed: running longer than WatchdogSec= changes nothing (else a daemon that
    # never sends WATCHDOG=1 would pass what follows).
    changed() { load_props fanoutd; [ "${P[MainPID]}" != "$main" ] || [ "${P[NRestarts]}" != "$restarts" ]; }
    if wait_until 6 changed; then
        bad "restarted without being stopped: MainPID $main -> ${P[MainPID]}, NRestarts $restarts -> ${P[NRestarts]}; WATCHDOG=1 not sent?"
        return 1
    fi
    mark=$(cursor)
    ct_signal STOP "$main" || bad "cannot SIGSTOP the supervisor (pid $main)" || return 1
    # 4 s without WATCHDOG=1, SIGABRT (systemd adds SIGCONT), RestartSec=2s, start again.
    restarted() {
        load_props fanoutd
        [ "${P[NRestarts]}" -gt "$restarts" ] && [ "${P[MainPID]}" != "$main" ] \
            && [ "${P[MainPID]}" != 0 ] && all_up fanoutd
    }
    wait_until 45 restarted
    ct_signal CONT "$main" 2>/dev/null || true
    journal_has "$mark" fanoutd 'Watchdog timeout' || bad "no watchdog timeout in the journal within 45 s of SIGSTOP; $(state)" || return 1
    [ "${P[NRestarts]}" -gt "$restarts" ] || bad "NRestarts still $restarts" || return 1
    [ "${P[MainPID]}" != "$main" ] && [ "${P[MainPID]}" != 0 ] || bad "MainPID ${P[MainPID]} (was $main)" || return 1
    all_up fanoutd || bad "not running again: $(state), '${P[StatusText]}'" || return 1
    what="fed for 6 s; SIGSTOP of MainPID $main: watchdog timeout, NRestarts $restarts -> ${P[NRestarts]}, new MainPID ${P[MainPID]}, active again"
}

check_stop() {
    ensure_running || return 1
    local mark rc=0 left crash
    mark=$(cursor)
    ct timeout 60 systemctl stop fanoutd 2>/dev/null || rc=$?
    [ "$rc" = 0 ] || bad "systemctl stop exited $rc: $(job_failure "$mark" fanoutd)" || return 1
    load_props fanoutd
    crash=$(crash_line "$mark" fanoutd)
    [ "${P[ActiveState]}" = inactive ] && [ "${P[Result]}" = success ] \
        || bad "ActiveState=${P[ActiveState]} Result=${P[Result]} (status ${P[ExecMainStatus]}); $crash" || return 1
    [ "${P[ExecMainStatus]}" = 0 ] || bad "the supervisor exited ${P[ExecMainStatus]}" || return 1
    [ -z "$crash" ] || bad "the journal has: $crash" || return 1
    left=$(probe leftovers)
    [ -z "$left" ] || bad "fanoutd processes left: $(tr '\n' ';' <<<"$left")" || return 1
    what="inactive, Result=success, exit 0, no process left"
}

check_template() {
    write_config cap0.yaml 2 1  # ports 7441 and 9741
    ct systemctl daemon-reload
    local mark rc=0 before after=""
    mark=$(cursor)
    ct timeout 60 systemctl start fanoutd@cap0 2>/dev/null || rc=$?
    [ "$rc" = 0 ] || bad "systemctl start fanoutd@cap0 exited $rc: $(job_failure "$mark" fanoutd@cap0)" || return 1
    all_up fanoutd@cap0 2 || bad "$(state), '${P[StatusText]}'" || return 1
    before=$(probe packets 9741 cap0)
    probe inject inj0 500 || bad "injecting frames on inj0 failed" || return 1
    grown() { after=$(probe packets 9741 cap0); [ "$after" -ge $((before + 500)) ]; }
    wait_until 10 grown || bad "fanoutd_kernel_packets_total on :9741 $before -> $after after 500 frames" || return 1
    ct timeout 60 systemctl stop fanoutd@cap0 2>/dev/null || rc=$?
    [ "$rc" = 0 ] || bad "systemctl stop fanoutd@cap0 exited $rc: $(job_failure "$mark" fanoutd@cap0)" || return 1
    load_props fanoutd@cap0
    [ "${P[ActiveState]}" = inactive ] && [ "${P[Result]}" = success ] \
        || bad "after stop: ActiveState=${P[ActiveState]} Result=${P[Result]}; $(crash_line "$mark" fanoutd@cap0)" || return 1
    local crash
    crash=$(crash_line "$mark" fanoutd@cap0)
    [ -z "$crash" ] || bad "the journal has: $crash" || return 1
    what="fanoutd@cap0 active with 2/2 workers, captured ($before -> $after), stopped: Result=success"
}

check_template_gives_up() {
    cp "$root/etc/fanoutd/cap0.yaml" "$root/etc/fanoutd/nosuch0.yaml"
    local t0=$SECONDS restarts
    ct systemctl start --no-block fanoutd@nosuch0
    gave_up() { load_props fanoutd@nosuch0; [ "$(state)" = failed/failed ]; }
    local ok=1
    wait_until 60 gave_up || ok=0
    if [ "$ok" = 1 ]; then
        # ... and stays failed: watch it for longer than RestartSec plus a start.
        restarts=${P[NRestarts]}
        still() { load_props fanoutd@nosuch0; [ "$(state)" != failed/failed ] || [ "${P[NRestarts]}" != "$restarts" ]; }
        if wait_until 8 still; then ok=2; fi
    fi
    ct systemctl stop fanoutd@nosuch0 2>/dev/null || true
    ct systemctl reset-failed fanoutd@nosuch0 2>/dev/null || true
    case $ok in
        0) bad "still $(state) after 60 s, NRestarts=${P[NRestarts]}: restarting forever" ;;
        2) bad "failed, then $(state) with NRestarts $restarts -> ${P[NRestarts]}" ;;
        *) what="failed after $((SECONDS - t0)) s (Result=${P[Result]}, NRestarts=${P[NRestarts]}) and stayed failed" ;;
    esac
}

check_journal() {
    local out hits
    out=$(ct journalctl --no-pager -q -u fanoutd -u 'fanoutd@*')
    hits=$(grep -cE "$crash_re" <<<"$out" || true)
    [ "$hits" = 0 ] || bad "$hits lines matching /$crash_re/ in this run's journal, e.g. $(grep -m1 -E "$crash_re" <<<"$out")" || return 1
    what="no traceback or refused permission in fanoutd's journal for the whole run"
}

# ---------------------------------------------------------------------------------------

host_tools
t=$SECONDS; cached_base; t_base=$((SECONDS - t))
t=$SECONDS; make_root; install_fanoutd; t_install=$((SECONDS - t))
t=$SECONDS; boot; make_veth; t_boot=$((SECONDS - t))

say "checks"
t=$SECONDS
run_check start               check_start               fanoutd
run_check status              check_status              fanoutd
run_check metrics             check_metrics             fanoutd
run_check privileges          check_privileges          -
run_check privileges-threads  check_privileges_threads  -
run_check reload              check_reload              fanoutd
run_check reload-invalid      check_reload_invalid      fanoutd
run_check hung-worker         check_hung_worker         fanoutd
run_check link-recreated      check_link                fanoutd
run_check watchdog            check_watchdog            fanoutd
run_check stop                check_stop                fanoutd
run_check template            check_template            fanoutd@cap0
run_check template-gives-up   check_template_gives_up   fanoutd@nosuch0
run_check journal             check_journal             -
t_checks=$((SECONDS - t))

say "base ${t_base} s, copy + install ${t_install} s, boot ${t_boot} s, checks ${t_checks} s"
say "$(( ${#summary[@]} - failed ))/${#summary[@]} checks passed"
[ "$failed" = 0 ]
