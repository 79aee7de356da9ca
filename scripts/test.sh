#!/usr/bin/env bash
# Set everything up (scripts/_env.sh), then run the tests from the repository root; arguments go
# to pytest, e.g. scripts/test.sh tests/test_config.py -n 0
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$METAKD_REPO"
exec python -m pytest -q "$@"
