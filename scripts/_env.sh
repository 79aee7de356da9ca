# Sourced by scripts/run.sh and scripts/test.sh: make (or reuse) the virtual environment, activate it.
#
#   VENV=DIR            where the environment lives (default: .venv in the repository root)
#   PYTHON=python3.12   the interpreter that creates it (3.10 or newer; default python3)
#   METAKD_TORCH=auto   which PyTorch build to install when the environment has none:
#       auto   the CUDA build if `nvidia-smi -L` lists a GPU, else the CPU build (the default)
#       cpu    the CPU build: a local +cpu wheel from pip's find-links if there is one, else
#              PyTorch's CPU index (https://download.pytorch.org/whl/cpu)
#       cuda   PyPI's default torch (on Linux: a CUDA build, several GB)
#       skip   install none here; `pip install -e .` then takes torch from your pip's indexes
#       other  passed to `pip install` as is, e.g. "torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121"
#
# A torch already in the environment is kept whatever METAKD_TORCH says: to change the build,
# remove the environment (rm -rf .venv) or point VENV elsewhere. The package is installed
# editable (`pip install -e ".[dev]"`), so edits to the code need no reinstall; it is reinstalled
# only when pyproject.toml (dependencies, entry points) changes, recorded in $VENV/.metakd-stamp.

set -euo pipefail

METAKD_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$METAKD_REPO/.venv}"
METAKD_TORCH="${METAKD_TORCH:-auto}"
METAKD_CPU_INDEX="https://download.pytorch.org/whl/cpu"

_say() { printf '==> %s\n' "$*" >&2; }
_die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

_make_venv() {
    local python="${PYTHON:-python3}"
    command -v "$python" >/dev/null || _die "$python not found: install Python 3.10 or newer, or set PYTHON=/path/to/python3"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || _die "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); metakd-run needs 3.10 or newer: set PYTHON=/path/to/python3.10+"
    _say "creating the virtual environment $VENV"
    "$python" -m venv "$VENV" || _die "could not create $VENV (on Debian/Ubuntu: apt install python3-venv)"
}

# The newest local CPU wheel of torch for this Python in pip's find-links folders, as a version
# (e.g. 2.13.0+cpu), or nothing. Installing it takes a minute; PyTorch's CPU index needs the network.
_local_cpu_torch() {
    python - <<'EOF'
import glob, os, re, subprocess, sys

listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
folders = []
for line in listing.splitlines():
    key, _, value = line.partition("=")
    if key.endswith("find-links"):
        for item in value.strip().strip("'\"").split():
            path = item[len("file://"):] if item.startswith("file://") else item
            if os.path.isdir(path):
                folders.append(path)
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
versions = {
    os.path.basename(wheel).split("-")[1]
    for folder in folders
    for wheel in glob.glob(os.path.join(folder, f"torch-*+cpu-{tag}-{tag}-*.whl"))
}
numbers = lambda v: [int(x) for x in re.findall(r"\d+", v.split("+")[0])]
print(max(versions, key=numbers) if versions else "")
EOF
}

_cpu_index_reachable() {
    python - "$METAKD_CPU_INDEX/torch/" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10).close()
except Exception:
    sys.exit(1)
EOF
}

_install_cpu_torch() {
    local version
    version="$(_local_cpu_torch)"
    if [ -n "$version" ]; then
        _say "installing PyTorch $version (CPU build, from pip's find-links)"
        python -m pip install --quiet "torch==$version" && return 0
        _say "the local wheel did not install; trying PyTorch's CPU index"
    fi
    # pip retries an unreachable index about 7 s per package (over 2 minutes for torch and its
    # dependencies), so one quick request decides first.
    _cpu_index_reachable || _die "cannot reach $METAKD_CPU_INDEX for the CPU build of PyTorch, and pip's find-links hold no CPU wheel: connect to the network, or set METAKD_TORCH=cuda (PyPI's default build) or METAKD_TORCH='<pip install arguments>'"
    _say "installing PyTorch (CPU build, from $METAKD_CPU_INDEX)"
    python -m pip install --quiet torch --index-url "$METAKD_CPU_INDEX"
}

_install_torch() {
    local choice="$METAKD_TORCH"
    if [ "$choice" = auto ]; then
        choice=cpu
        if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then choice=cuda; fi
    fi
    case "$choice" in
        skip) _say "METAKD_TORCH=skip: not installing PyTorch here" ;;
        cpu) _install_cpu_torch ;;
        cuda)
            _say "installing PyTorch (PyPI's default build: CUDA on Linux)"
            python -m pip install --quiet torch
            ;;
        *)
            _say "installing PyTorch: pip install $choice"
            # shellcheck disable=SC2086  # word splitting intended: a spec plus pip options
            python -m pip install --quiet $choice
            ;;
    esac
}

[ -x "$VENV/bin/python" ] || _make_venv
# shellcheck disable=SC1091
source "$VENV/bin/activate"

if ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    _install_torch || _die "installing PyTorch failed (see pip's message above); METAKD_TORCH=$METAKD_TORCH"
fi

_stamp="$(python - "$METAKD_REPO" <<'EOF'
import hashlib, pathlib, sys
repo = pathlib.Path(sys.argv[1])
digest = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()
print(f"{digest} {repo} {sys.version.split()[0]}")
EOF
)"
if [ "$(cat "$VENV/.metakd-stamp" 2>/dev/null)" != "$_stamp" ]; then
    _say "installing metakd-run (editable) with its test and sweep tools"
    python -m pip install --quiet -e "$METAKD_REPO[dev]" || _die "pip install -e \"$METAKD_REPO[dev]\" failed (see pip's message above)"
    printf '%s\n' "$_stamp" >"$VENV/.metakd-stamp"
fi
unset _stamp
