#!/usr/bin/env bash
# Install capibara6 as a systemd service on a fresh Debian/Ubuntu arm64 VM (Google Cloud Axion C4A).
# Run as root from a checkout:  sudo ./scripts/install_c4a.sh [--start] [--per-role]
#   /opt/capibara6            the code and its .venv (llama-cpp-python built for Neoverse-V2)
#   /etc/capibara6/           capibara6.env (settings), models.yaml (registry): created once, never overwritten
#   /var/lib/capibara6/models the GGUF files (copy them there; owned by the capibara6 user)
#   /etc/systemd/system/      capibara6.service (all roles, default) or capibara6@{role}.service
# Idempotent: re-running updates the code and units, keeps your settings, and rebuilds
# llama-cpp-python only when the CPU probe picks other flags or CAPIBARA6_REBUILD_LLAMA=1.
set -euo pipefail

PREFIX=/opt/capibara6
ETC=/etc/capibara6
STATE=/var/lib/capibara6
USER_NAME=capibara6
START=0
PER_ROLE=0
for arg in "$@"; do
  case "$arg" in
    --start) START=1 ;;
    --per-role) PER_ROLE=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install_c4a.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "install_c4a.sh: run as root (sudo)" >&2
  exit 1
fi
SRC="$(cd "$(dirname "$0")/.." && pwd)"
ARCH="$(uname -m)"
if [ "$ARCH" != "aarch64" ]; then
  echo "install_c4a.sh: warning: $ARCH is not arm64; building without the Neoverse-V2 flags" >&2
fi

echo "== apt packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-dev build-essential cmake pkg-config git rsync curl ca-certificates >/dev/null

echo "== user and directories"
if ! id "$USER_NAME" >/dev/null 2>&1; then
  useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
install -d -m 0755 "$PREFIX" "$ETC"
install -d -o "$USER_NAME" -g "$USER_NAME" -m 0750 "$STATE" "$STATE/models" "$STATE/cache"

echo "== code -> $PREFIX"
if [ "$SRC" != "$PREFIX" ]; then
  rsync -a --delete --exclude .venv --exclude .git --exclude '*.gguf' --exclude '*.so' \
    --exclude __pycache__ --exclude .pytest_cache "$SRC"/ "$PREFIX"/
fi

echo "== Python venv in $PREFIX/.venv"
if [ ! -x "$PREFIX/.venv/bin/python" ]; then
  python3 -m venv "$PREFIX/.venv"
fi
. "$PREFIX/.venv/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
# from source, never a generic wheel: the build is what makes it fast on this CPU. The CPU probe
# keeps Neoverse-V2's native flags (SVE2, i8mm, bf16) and Arm's KleidiAI micro-kernels when every
# extension the CPU reports really runs (scripts/_llama.sh); CMAKE_ARGS set by you wins.
C6_SRC="$PREFIX"
C6_STATE="$PREFIX/.venv/capibara6-build.json"
c6_rebuild_kernels_portable() { CAPIBARA6_PORTABLE=1 python -m pip install -q --no-deps --force-reinstall "$PREFIX"; }
. "$PREFIX/scripts/_llama.sh"
c6_decide
c6_install_llama "$C6_LLAMA_CMAKE_ARGS"
python -m pip install -q "$PREFIX"
c6_prove

echo "== settings in $ETC (existing files kept)"
if [ ! -e "$ETC/capibara6.env" ]; then
  install -m 0640 -o root -g "$USER_NAME" "$PREFIX/deploy/capibara6.env" "$ETC/capibara6.env"
fi
if [ ! -e "$ETC/models.yaml" ]; then
  install -m 0640 -o root -g "$USER_NAME" "$PREFIX/deploy/models.c4a.yaml" "$ETC/models.yaml"
fi

echo "== systemd units"
install -m 0644 "$PREFIX/deploy/capibara6.service" "$PREFIX/deploy/capibara6@.service" \
  "$PREFIX/deploy/capibara6-roles.target" /etc/systemd/system/
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ "$PER_ROLE" = "1" ]; then
    systemctl disable --now capibara6.service >/dev/null 2>&1 || true
    systemctl enable capibara6-roles.target capibara6@standard.service capibara6@streaming.service capibara6@consensus.service
    UNIT=capibara6-roles.target
  else
    systemctl disable --now capibara6-roles.target >/dev/null 2>&1 || true
    systemctl enable capibara6.service
    UNIT=capibara6.service
  fi
  if [ "$START" = "1" ]; then
    systemctl restart "$UNIT"
  fi
else
  echo "install_c4a.sh: systemd is not running here: units installed, not enabled" >&2
  UNIT=capibara6.service
fi

cat <<EOF
capibara6 installed.
  models:   copy the GGUF files named in $ETC/models.yaml to $STATE/models/ (chown $USER_NAME)
  settings: $ETC/capibara6.env (API key, host, limits)
  start:    systemctl start $UNIT ; logs: journalctl -u 'capibara6*' -o cat
  check:    curl -s localhost:8082/ready ; curl -s localhost:8082/metrics | head
EOF
