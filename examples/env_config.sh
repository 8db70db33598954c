#!/usr/bin/env bash
# The two services of two_services.py as separate processes, configured the way a deployment would be:
# by MESHLIB_* environment variables, with no service addresses in the code.
#
#   examples/env_config.sh            (from the project root; uses .venv/bin/python unless PY is set)
#
# Ports 18080-18082 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# Two instances of "users": plain HTTP servers, they know nothing of meshlib.
$PY examples/two_services.py users --name users-1 --port 18081 &
$PY examples/two_services.py users --name users-2 --port 18082 &

# The frontend reaches http://users/... through meshlib.Client(); this is where "users" lives.
MESHLIB_SERVICE_USERS=static://127.0.0.1:18081,127.0.0.1:18082 \
MESHLIB_SERVICE_USERS__LB=round_robin \
  $PY examples/two_services.py frontend --port 18080 &

# The caller reaches http://frontend/... the same way (it waits until the frontend is up).
MESHLIB_SERVICE_FRONTEND=static://127.0.0.1:18080 \
  $PY examples/two_services.py call --requests 6
