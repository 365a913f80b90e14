#!/usr/bin/env bash
# Debian's Chromium, for the report page's browser tests (tests/test_report_browser.py).
# Installed once by `make test` when missing; needs root (or sudo) and Debian's apt.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; install Chromium yourself (the browser tests need it)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install_chromium: not root and no sudo: install the 'chromium' package yourself" >&2
    exit 0
  fi
fi
echo "Installing Debian's chromium for the browser tests (once)..."
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
