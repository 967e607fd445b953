#!/usr/bin/env bash
# Install headless Chromium for tests/test_report.py (the report's browser test); idempotent.
#   bash scripts/ci_install_chromium.sh
# Debian (and Debian-based CI images): the `chromium` package. Runs apt-get only when no usable
# Chromium is found; as root or through sudo. Ubuntu's `chromium` package is a snap stub that does
# not run in containers: there, point BRANCHGRPO_CHROMIUM at any Chrome/Chromium binary instead.
set -euo pipefail

have_chromium() {
  local bin
  if [ -n "${BRANCHGRPO_CHROMIUM:-}" ]; then
    "$BRANCHGRPO_CHROMIUM" --version >/dev/null 2>&1 && { echo "$BRANCHGRPO_CHROMIUM"; return 0; }
  fi
  for bin in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$bin" >/dev/null 2>&1 && "$bin" --version >/dev/null 2>&1; then
      command -v "$bin"
      return 0
    fi
  done
  return 1
}

if found=$(have_chromium); then
  echo "ci_install_chromium: already installed: $found ($("$found" --version 2>/dev/null))"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_install_chromium: no apt-get here; install Chromium yourself or set BRANCHGRPO_CHROMIUM" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ci_install_chromium: need root or sudo to apt-get install chromium" >&2
    exit 1
  fi
fi
if [ -r /etc/os-release ] && grep -q '^ID=ubuntu' /etc/os-release; then
  echo "ci_install_chromium: warning: on Ubuntu the chromium package needs snap; prefer a Debian image" >&2
fi

export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
  if $SUDO apt-get update -qq && \
     $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; then
    break
  fi
  if [ "$attempt" = 3 ]; then
    echo "ci_install_chromium: apt-get failed 3 times" >&2
    exit 1
  fi
  sleep $((attempt * 10))
done

found=$(have_chromium) || { echo "ci_install_chromium: chromium installed but does not start" >&2; exit 1; }
echo "ci_install_chromium: installed $found ($("$found" --version 2>/dev/null))"
