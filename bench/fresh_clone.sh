#!/usr/bin/env bash
# What CI and a new user do, timed: clone HEAD into an empty folder, run .ci/run (make test, venv
# built from nothing), then `make stress RATE=50` (the README's first command) in that clone.
# Writes bench/results-fresh-clone.md. About 18 minutes on 2 cores. SKIP_CI=1: only the venv
# (make install) and `make stress RATE=50`, about 5 minutes.
#   bash bench/fresh_clone.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/bench/results-fresh-clone.md"
tmp=$(mktemp -d /tmp/replay-fresh-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$root" "$tmp/replay"
cd "$tmp/replay"
commit=$(git log --oneline -1)
load0=$(cut -d' ' -f1 /proc/loadavg)
t0=$(date +%s)
rc=0
if [ "${SKIP_CI:-0}" = 1 ]; then
  make install > "$tmp/ci.log" 2>&1 || rc=$?
else
  bash .ci/run > "$tmp/ci.log" 2>&1 || rc=$?
fi
t1=$(date +%s)
src=0
load1=$(cut -d' ' -f1 /proc/loadavg)
make stress RATE=50 > "$tmp/stress.log" 2>&1 || src=$?
t2=$(date +%s)
{
  echo "# Fresh clone: CI and the main job"
  echo
  echo "Written by \`bench/fresh_clone.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $load0 at the start."
  echo "Commit tested: \`$commit\`."
  echo
  if [ "${SKIP_CI:-0}" = 1 ]; then
    echo "## \`make install\` (SKIP_CI=1: venv from nothing, no tests)"
  else
    echo "## \`bash .ci/run\` (make test: venv from nothing, tiny model, ruff, pytest)"
  fi
  echo
  echo "exit $rc, wall $(( (t1 - t0) / 60 ))m$(( (t1 - t0) % 60 ))s"
  echo
  echo '```'
  grep -E "^venv ready|passed|failed|error" "$tmp/ci.log" | tail -5
  echo '```'
  echo
  echo "## \`make stress RATE=50\` in the same clone (venv already built)"
  echo
  echo "exit $src, wall $(( (t2 - t1) / 60 ))m$(( (t2 - t1) % 60 ))s, load average $load1 at its start"
  echo
  echo '```'
  sed -n '/replay run --target/,$p' "$tmp/stress.log"
  echo '```'
} > "$out"
echo "wrote $out (ci exit $rc, stress exit $src)"
exit $(( rc || src ))
