#!/usr/bin/env bash
# Installs everything ddtool needs on a fresh machine: the Fashion-MNIST Debian package (when
# it is missing and we are root), then ddtool itself with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
        echo "note: Debian package dataset-fashion-mnist is not installed (needs root: apt-get install dataset-fashion-mnist);" \
             "ddtool also finds Fashion-MNIST in --data-root, \$DDTOOL_DATA or ~/.cache/ddtool/data." >&2
    fi
fi

python3 -m pip install -q -e '.[test]'
