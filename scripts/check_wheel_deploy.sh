#!/usr/bin/env bash
# Deploy check (issue 9): a wheel deploy, done from outside the source tree.
#
# Builds a wheel from the checkout's files (those git tracks or would add: never
# build/ or *.egg-info leftovers), installs it with the postgres extra into a fresh
# venv in a temporary folder and, from another temporary folder, for a new SQLite
# database and (when TEST_POSTGRES_URL is set) a new PostgreSQL database:
#
#   flask --app myapp db upgrade
#   gunicorn -c python:myapp.gunicorn_conf 'myapp:create_app()'
#
# then registers, logs in, writes a post and finds it on the index page over HTTP.
# Prints one line on success; on failure, what failed and the end of its output,
# and exits 1. Everything it made (server, database, folders) is removed at exit.
#
# Usage: scripts/check_wheel_deploy.sh      PYTHON=python3.12 picks the interpreter.
set -euo pipefail

NAME=check_wheel_deploy
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

# Nothing from the caller's environment may point Python at the source tree.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV FLASK_APP
export PYTHONNOUSERSITE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 FLASK_DEBUG=0

work=$(mktemp -d "${TMPDIR:-/tmp}/myapp-wheel-deploy.XXXXXX")
venv=$work/venv
mkdir "$work/logs" "$work/run"
gunicorn_pid=""
pg_database=""
steps=0

fail() {
  echo "$NAME: FAILED: $*" >&2
  exit 1
}

show_log() {  # the end of a log, indented, on stderr
  tail -n 40 "$1" | sed 's/^/    | /' >&2
}

# step DESCRIPTION SECONDS COMMAND...: run COMMAND quietly, at most SECONDS long.
step() {
  local what=$1 seconds=$2 status=0 log
  shift 2
  steps=$((steps + 1))
  log="$work/logs/step-$steps.log"
  timeout "$seconds" "$@" >"$log" 2>&1 </dev/null || status=$?
  if [ "$status" -ne 0 ]; then
    [ "$status" -eq 124 ] && what="$what (timed out after ${seconds} s)"
    echo "$NAME: FAILED: $what; its output ends with:" >&2
    show_log "$log"
    exit 1
  fi
}

stop_gunicorn() {
  [ -n "$gunicorn_pid" ] || return 0
  local pid=$gunicorn_pid deadline=$((SECONDS + 30))
  gunicorn_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$NAME: gunicorn (pid $pid) ignored SIGTERM for 30 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_gunicorn
  if [ -n "$pg_database" ]; then
    timeout 60 "$venv/bin/python" "$work/pg.py" drop "$TEST_POSTGRES_URL" "$pg_database" >/dev/null 2>&1 ||
      echo "$NAME: could not drop the PostgreSQL database $pg_database; drop it by hand" >&2
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case "$work/" in
  "$ROOT"/*) fail "the temporary folder $work is inside the source tree; set TMPDIR elsewhere" ;;
esac

# -- build the wheel from a copy of the checkout, install it in a fresh venv ---------

mkdir "$work/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' file; do
      if [ -e "$ROOT/$file" ]; then printf '%s\0' "$file"; fi  # not deleted in the work tree
    done |
    tar -C "$ROOT" --null -T - -cf - | tar -C "$work/src" -xf -
else
  tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    -cf - . | tar -C "$work/src" -xf -
fi

step "create a venv with $PYTHON" 120 "$PYTHON" -m venv "$venv"
step "build the wheel" 600 "$venv/bin/python" -m pip wheel --no-deps -w "$work/dist" "$work/src"
wheels=("$work"/dist/myapp-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || fail "expected one myapp wheel in $work/dist, found: ${wheels[*]}"
wheel=${wheels[0]}
rm -rf "$work/src"  # from here on, no source tree exists but the real one, far away
step "install $(basename "$wheel")[postgres]" 600 "$venv/bin/python" -m pip install "$wheel[postgres]"

# Every command below runs from an empty folder, as a deploy would.
cd "$work/run"
step "import myapp from the venv, not from a source tree" 60 "$venv/bin/python" -c '
import sys
from pathlib import Path
import myapp
where = Path(myapp.__file__).resolve()
if Path(sys.prefix).resolve() not in where.parents:
    sys.exit(f"myapp was imported from {where}, outside {sys.prefix}")
'

# -- helpers run by the venv's Python -------------------------------------------------

cat >"$work/pg.py" <<'EOF'
"""pg.py create|drop SERVER_URL NAME, or pg.py url SERVER_URL NAME (prints the new URL)."""
import sys

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

action, server, name = sys.argv[1:]
if action == "url":
    print(make_url(server).set(database=name).render_as_string(hide_password=False))
    sys.exit()
engine = create_engine(server, isolation_level="AUTOCOMMIT")
with engine.connect() as connection:
    if action == "create":
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    else:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
engine.dispose()
EOF

cat >"$work/use_site.py" <<'EOF'
"""use_site.py BASE_URL: register, log in, write a post and find it on the index page,
as a browser would (cookies, CSRF tokens from the forms, redirects looked at)."""
import http.cookiejar
import re
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request

base = sys.argv[1]


class SeeRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 302 is answered to us, not followed


opener = urllib.request.build_opener(
    urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), SeeRedirects()
)


def fetch(path, form=None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        with opener.open(base + path, data, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode(errors="replace")


def expect(condition, message):
    if not condition:
        sys.exit(message)


def submit(path, **fields):
    status, _, page = fetch(path)
    expect(status == 200, f"GET {path} answered {status}")
    token = re.search(r'<input[^>]*\bname="csrf_token"[^>]*\bvalue="([^"]+)"', page)
    expect(token is not None, f"GET {path}: no csrf_token field in the form")
    return fetch(path, {"csrf_token": token.group(1), **fields})


status, _, body = fetch("/readyz")
expect(status == 200, f"GET /readyz answered {status}: {body}")

marker = secrets.token_hex(4)
username, password = f"wheel-{marker}", secrets.token_urlsafe(16)
status, headers, _ = submit("/auth/register", username=username, password=password)
expect(status == 302 and headers.get("Location", "").endswith("/auth/login"),
       f"POST /auth/register answered {status} {headers.get('Location')}, not a redirect to /auth/login")
status, headers, _ = submit("/auth/login", username=username, password=password)
expect(status == 302, f"POST /auth/login answered {status}, not a redirect")

title, text = f"Deployed from a wheel {marker}", f"Migrated and served from outside the source tree {marker}."
status, headers, _ = submit("/posts/new", title=title, body=text)
location = headers.get("Location", "")
expect(status == 302 and "/posts/" in location, f"POST /posts/new answered {status} {location}")
status, _, page = fetch(location if location.startswith("/") else urllib.parse.urlsplit(location).path)
expect(status == 200 and title in page, f"the new post's page answered {status} without its title")
status, _, page = fetch("/")
expect(status == 200, f"GET / answered {status}")
expect(title in page and text in page and username in page, "the new post is not on the index page")
EOF

# -- migrate and serve each database ----------------------------------------------------

SECRET_KEY=$("$venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))')
export SECRET_KEY
gunicorn_options=(-c python:myapp.gunicorn_conf)
# gunicorn 25+ opens a control socket at one path in $HOME; another server may hold it.
gunicorn_help=$("$venv/bin/gunicorn" --help 2>/dev/null || true)
if [[ $gunicorn_help == *--no-control-socket* ]]; then
  gunicorn_options+=(--no-control-socket)
fi

migrate_serve_and_use() {  # LABEL DATABASE_URL
  local label=$1 port log deadline
  export DATABASE_URL=$2
  step "flask --app myapp db upgrade ($label)" 120 "$venv/bin/flask" --app myapp db upgrade

  port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log="$work/logs/gunicorn-$label.log"
  GUNICORN_BIND="127.0.0.1:$port" GUNICORN_ACCESS_LOG=- \
    "$venv/bin/gunicorn" "${gunicorn_options[@]}" 'myapp:create_app()' >"$log" 2>&1 </dev/null &
  gunicorn_pid=$!

  deadline=$((SECONDS + 60))
  until "$venv/bin/python" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).close()' "http://127.0.0.1:$port/healthz" 2>/dev/null; do
    if ! kill -0 "$gunicorn_pid" 2>/dev/null; then
      echo "$NAME: FAILED: gunicorn ($label) exited before answering /healthz; its log ends with:" >&2
      show_log "$log"
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$NAME: FAILED: gunicorn ($label) did not answer /healthz within 60 s; its log ends with:" >&2
      show_log "$log"
      exit 1
    fi
    sleep 0.2
  done

  step "register, log in and post over HTTP ($label)" 120 "$venv/bin/python" "$work/use_site.py" "http://127.0.0.1:$port"
  stop_gunicorn
  if grep -q Traceback "$log"; then
    echo "$NAME: FAILED: gunicorn ($label) logged a traceback:" >&2
    show_log "$log"
    exit 1
  fi
}

databases=sqlite
migrate_serve_and_use sqlite "sqlite:///$work/run/deploy.sqlite"

if [ -n "${TEST_POSTGRES_URL:-}" ]; then
  name="myapp_wheel_$("$venv/bin/python" -c 'import secrets; print(secrets.token_hex(4))')"
  step "create a PostgreSQL database on TEST_POSTGRES_URL's server" 60 \
    "$venv/bin/python" "$work/pg.py" create "$TEST_POSTGRES_URL" "$name"
  pg_database=$name
  migrate_serve_and_use postgresql "$("$venv/bin/python" "$work/pg.py" url "$TEST_POSTGRES_URL" "$name")"
  databases="$databases and postgresql"
fi

echo "$NAME: OK: $(basename "$wheel") installed outside the source tree; flask db upgrade," \
  "gunicorn -c python:myapp.gunicorn_conf, register/login/post over HTTP on $databases"
