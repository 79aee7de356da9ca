#!/usr/bin/env bash
# Set everything up (scripts/_env.sh: the virtual environment, PyTorch, metakd-run), then run
# the experiment with your overrides, e.g. scripts/run.sh experiment=omniglot_5w1s_cpu seed=3
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec metakd-run "$@"
