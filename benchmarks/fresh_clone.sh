#!/usr/bin/env bash
# Time the set-up commands on a fresh clone: wall and CPU seconds (user + system of the step and its
# children) of each step, the load average before and after, and the torch that was installed.
#
#   bash benchmarks/fresh_clone.sh run  cold   # make .venv/.installed, then make run
#   bash benchmarks/fresh_clone.sh run  warm   # the same with uv's cache kept
#   bash benchmarks/fresh_clone.sh test cold   # make .venv/.installed-dev (make test's environment)
#   bash benchmarks/fresh_clone.sh pip  cold   # the run environment by the pip fallback (HAVE_UV=false)
#   bash benchmarks/fresh_clone.sh pip-test cold   # the test environment by the pip fallback
#
# "cold" empties uv's cache (a fresh UV_CACHE_DIR) and turns pip's cache off. One line per call is
# appended to $LOG (default /tmp/fresh_clone.log). REPO (default: this repository) is cloned into
# a new folder under /tmp, so only committed work is measured.
set -uo pipefail
what=${1:?run, test, pip or pip-test}
cache=${2:-cold}
repo=${REPO:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
log=${LOG:-/tmp/fresh_clone.log}
dir=$(mktemp -d /tmp/fresh-XXXX)
git clone -q "$repo" "$dir/repo" && cd "$dir/repo" || exit 1
if [ "$cache" = cold ]; then
    export UV_CACHE_DIR=$dir/uv-cache PIP_NO_CACHE_DIR=1
fi

step() {  # step NAME make-arguments...: time one make call, print "NAME wall W cpu C rc R"
    local name=$1; shift
    /usr/bin/time -o "$dir/$name.time" -f "%e %U %S" make "$@" > "$dir/$name.log" 2>&1
    local rc=$?
    read -r w u s < "$dir/$name.time"
    echo "$name wall $w cpu $(echo "$u + $s" | bc) rc $rc"
}

load0=$(cut -d' ' -f1 /proc/loadavg)
case $what in
    run) out="$(step environment .venv/.installed) | $(step job run)" ;;
    test) out="$(step test-environment .venv/.installed-dev)" ;;
    pip) out="$(step pip-environment .venv/.installed HAVE_UV=false)" ;;
    pip-test) out="$(step pip-test-environment .venv/.installed-dev HAVE_UV=false)" ;;
    *) echo "unknown: $what" >&2; exit 2 ;;
esac
load1=$(cut -d' ' -f1 /proc/loadavg)
torch=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null)
echo "$(date -u +%FT%TZ) $what $cache commit $(git rev-parse --short HEAD) | $out | load $load0 -> $load1 | torch $torch | logs $dir" | tee -a "$log"
