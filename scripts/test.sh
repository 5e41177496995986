#!/usr/bin/env bash
# Runs the test suite. CI sets CI=true; the machine's PostgreSQL is used when it answers,
# else the tests start an embedded one (pgserver) of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TEST_DATABASE_URL:-}" ] && .venv/bin/python - <<'PY'
import sys, psycopg
try:
    psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
except Exception:
    sys.exit(1)
PY
then
  export TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres"
fi
echo "TEST_DATABASE_URL=${TEST_DATABASE_URL:-<embedded pgserver>}"
exec .venv/bin/python -m pytest -q -ra "$@"
