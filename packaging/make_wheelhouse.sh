#!/usr/bin/env bash
# Build an offline bundle: Quire's wheel plus every dependency's wheel, and install scripts.
set -euo pipefail
out="${1:-dist/quire-bundle}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out/wheels"
python -m pip wheel "$root" --wheel-dir "$out/wheels"
cp "$root/installer/linux/install.sh" "$out/"
cp "$root/installer/windows/install.ps1" "$out/"
echo "bundle written to $out"
