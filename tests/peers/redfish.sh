#!/usr/bin/env bash
# Redfish peer for corral's power-driver tests: sushy-tools' sushy-emulator with its fake driver
# (no libvirt), on 127.0.0.1 only. See tests/peers/README.md for how it behaves.
#   redfish.sh install               idempotent; venv in $CORRAL_PEERS_VENV (default /opt/corral-peers/venv)
#   redfish.sh start PORT DIR [--tls|--tls-ca]  prints the base URL; PID in DIR/redfish.pid, log in
#                                    DIR/redfish.log. --tls: a self-signed certificate; --tls-ca: a
#                                    certificate for 127.0.0.1 signed by a test CA made here, whose
#                                    certificate (for the driver's ca_file) is DIR/redfish-ca.crt
#   redfish.sh stop DIR
# Credentials admin/secret. Systems (fresh state on every start):
#   c0ffee00-0000-4000-8000-000000000001 "node-a"  starts Off
#   c0ffee00-0000-4000-8000-000000000002 "node-b"  starts On
# REDFISH_POWER_DELAY=N (default 2): a reset shows in PowerState N-1..N s later; "random" keeps
# upstream's 0..11 s, which makes tests slow and flaky; 0 makes it show on the next GET.
# Every authenticated request other than GET is recorded in DIR/redfish-requests.log, one JSON object a
# line ({"method", "path", "status", "body"}): sushy 2.2.0 accepts but ignores some fields
# (BootSourceOverrideEnabled always reads back "Continuous"), so tests check what was asked for there.
set -euo pipefail

VENV=${CORRAL_PEERS_VENV:-/opt/corral-peers/venv}
SUSHY_VERSION=2.2.0   # pinned: README documents this version's behaviour

die() { echo "redfish.sh: $*" >&2; exit 1; }

installed() {
  "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sushy-tools') != '$SUSHY_VERSION')" \
    2>/dev/null
}

install() {
  installed && return 0
  # Tests start emulators in parallel: one installs, the others wait for it. The lock's descriptor lives
  # only in this subshell, so the emulator started afterwards does not inherit (and hold) it.
  mkdir -p "$(dirname "$VENV")"
  ( flock 9; installed || install_locked ) 9>"$VENV.lock"
}

install_locked() {
  # Debian's packages (python3, python3-venv, openssl, curl) come from tests/deps.sh; only PyPI here.
  [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip' 2>/dev/null \
    || die "Debian's python3 with venv is missing: sudo tests/deps.sh installs it"
  # Debian's own python3, not whatever python3 comes first in PATH (pyenv etc.): python3-venv belongs to it.
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "sushy-tools==$SUSHY_VERSION"
}

start() {
  local port=${1:?usage: start PORT DIR [--tls|--tls-ca]} dir=${2:?usage: start PORT DIR [--tls|--tls-ca]} tls=${3:-}
  install
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  [ -f "$dir/redfish.pid" ] && kill -0 "$(cat "$dir/redfish.pid")" 2>/dev/null && die "already running in $dir"
  # The fake driver persists systems in sqlite and prefers that over the config: wipe it so each start is fresh.
  rm -rf "$dir/redfish-state"
  # sushy only accepts bcrypt htpasswd entries; the venv has bcrypt, so no apache2-utils needed.
  "$VENV/bin/python" -c "import bcrypt; print('admin:' + bcrypt.hashpw(b'secret', bcrypt.gensalt(rounds=4)).decode())" \
    > "$dir/redfish.htpasswd"
  local scheme=http
  cat > "$dir/redfish.conf" <<CONF
SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'
SUSHY_EMULATOR_LISTEN_PORT = $port
SUSHY_EMULATOR_FAKE_DRIVER = True
SUSHY_EMULATOR_STATE_DIR = '$dir/redfish-state'
SUSHY_EMULATOR_AUTH_FILE = '$dir/redfish.htpasswd'
SUSHY_EMULATOR_FAKE_SYSTEMS = [
    {'uuid': 'c0ffee00-0000-4000-8000-000000000001', 'name': 'node-a', 'power_state': 'Off',
     'nics': [{'mac': '52:54:00:00:00:01', 'ip': '127.0.0.1'}]},
    {'uuid': 'c0ffee00-0000-4000-8000-000000000002', 'name': 'node-b', 'power_state': 'On',
     'nics': [{'mac': '52:54:00:00:00:02', 'ip': '127.0.0.1'}]},
]
CONF
  if [ "$tls" = --tls-ca ] && [ ! -f "$dir/redfish.crt" ]; then
    # A CA of our own, and the emulator's certificate signed by it (not self-signed: rustls wants an
    # end-entity certificate under a CA, as a private BMC CA makes them).
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=corral test BMC CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$dir/redfish-ca.key" -out "$dir/redfish-ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
      -keyout "$dir/redfish.key" -out "$dir/redfish.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
      > "$dir/redfish.ext"
    openssl x509 -req -in "$dir/redfish.csr" -CA "$dir/redfish-ca.crt" -CAkey "$dir/redfish-ca.key" \
      -CAcreateserial -days 3650 -extfile "$dir/redfish.ext" -out "$dir/redfish.crt" 2>/dev/null
  fi
  if [ "$tls" = --tls ] || [ "$tls" = --tls-ca ]; then
    scheme=https
    [ -f "$dir/redfish.crt" ] || openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=127.0.0.1 \
      -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      -keyout "$dir/redfish.key" -out "$dir/redfish.crt" 2>/dev/null
    printf "SUSHY_EMULATOR_SSL_CERT = '%s'\nSUSHY_EMULATOR_SSL_KEY = '%s'\n" \
      "$dir/redfish.crt" "$dir/redfish.key" >> "$dir/redfish.conf"
  elif [ -n "$tls" ]; then die "unknown option $tls"; fi
  # The fake driver draws each reset's delay from random.randint(1, 11); swap its randint for a constant
  # rather than patching the installed package.
  : > "$dir/redfish-requests.log"
  REDFISH_REQUEST_LOG="$dir/redfish-requests.log" \
  REDFISH_POWER_DELAY=${REDFISH_POWER_DELAY:-2} "$VENV/bin/python" -c '
import os, sys
from sushy_tools.emulator.resources.systems import fakedriver
delay = os.environ["REDFISH_POWER_DELAY"]
if delay != "random":
    class FixedRandom:
        @staticmethod
        def randint(a, b):
            return int(delay)
    fakedriver.random = FixedRandom
import json, flask
from sushy_tools.emulator.main import app, main
# Runs behind the basic-auth middleware: only requests that passed authentication are recorded.
@app.after_request
def record(response):
    if flask.request.method != "GET":
        with open(os.environ["REDFISH_REQUEST_LOG"], "a") as f:
            f.write(json.dumps({"method": flask.request.method, "path": flask.request.path,
                                "status": response.status_code,
                                "body": flask.request.get_json(silent=True)}) + "\n")
    return response
sys.exit(main())' --config "$dir/redfish.conf" </dev/null >"$dir/redfish.log" 2>&1 &
  echo $! > "$dir/redfish.pid"
  local url="$scheme://127.0.0.1:$port"
  # /redfish/v1/ is served without auth, so it is a cheap readiness probe.
  for _ in $(seq 100); do
    curl -sfk -o /dev/null "$url/redfish/v1/" && { echo "$url"; return 0; }
    kill -0 "$(cat "$dir/redfish.pid")" 2>/dev/null || { cat "$dir/redfish.log" >&2; die "emulator exited"; }
    sleep 0.1
  done
  stop "$dir"; die "emulator did not answer on $url within 10 s"
}

stop() {
  local dir=${1:?usage: stop DIR} pid
  [ -f "$dir/redfish.pid" ] || return 0
  pid=$(cat "$dir/redfish.pid")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/redfish.pid"
}

cmd=${1:-}; shift || true
case "$cmd" in
  install) install ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  *) die "usage: $0 install | start PORT DIR [--tls|--tls-ca] | stop DIR" ;;
esac
