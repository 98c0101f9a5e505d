#!/usr/bin/env bash
# The distribution's headless Chromium for the browser tests and screenshots (Playwright drives it; Playwright's
# own browser download is not used). Nothing to do when it is there; apt-get as root, else through sudo.
set -euo pipefail
CHROMIUM="${1:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else
  echo "Chromium is missing at $CHROMIUM and this user cannot install it: run 'apt-get install chromium' as root" >&2
  exit 0
fi
"${apt[@]}" install -y -q chromium >/dev/null 2>&1 || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q chromium >/dev/null; }
echo "installed $("$CHROMIUM" --version)"
