#!/usr/bin/env bash
# The C encoder and unpacker (fanoutd/_fastpath.c) under AddressSanitizer and UBSan: build
# it with both into a copy of the package and run its differential and hostile-input
# tests against that copy (every corpus frame and truncation, random and mutated blocks,
# random and damaged messages). Any out-of-bounds read or undefined behaviour aborts.
#   ./scripts/sanitize.sh          (after ./scripts/install.sh --test)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
python=${PYTHON:-$repo/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cp -r fanoutd tests docs "$tmp/"
rm -f "$tmp"/fanoutd/_fastpath*.so
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=all -Wall -Wextra -Wno-unused-parameter -I"$include" \
    fanoutd/_fastpath.c -o "$tmp/fanoutd/_fastpath$suffix"

cd "$tmp"  # the copy, not the checkout, is what `import fanoutd` finds
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
export PYTHONPATH="$tmp"
"$python" -c "import fanoutd._fastpath as f, sys; assert f.__file__.startswith('$tmp'), f.__file__"
"$python" -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_wire.py \
    tests/test_batch.py "$@"
