#!/usr/bin/env bash
# Install Quire from the offline bundle next to this script (no network access).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prefix="${1:-$HOME/.local/share/quire}"
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --no-index --find-links "$here/wheels" quire
mkdir -p "$HOME/.local/share/applications"
sed "s#@QUIRE@#$prefix/venv/bin/quire#" "$here/quire.desktop" \
  > "$HOME/.local/share/applications/quire.desktop" 2>/dev/null || true
echo "Quire installed: $prefix/venv/bin/quire"
