#!/usr/bin/env bash
# Cold install time and size of a fresh virtual environment holding memnet, two ways:
#   all      every extra (train, demo, procfile): what `pip install .` installed before the
#            extras were split off
#   runtime  `pip install .`: what the worker and the client commands run on
# "Cold": pip's cache is not used (--no-cache-dir); packages still come from the configured
# index. Usage: scripts/install_size.sh [WORKDIR]   (default: a new temporary directory)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t memnet-install-XXXXXX)}"
mkdir -p "$work"
python="${PYTHON:-python3}"

echo "$(date -u +%Y-%m-%d), $(nproc) cores, $("$python" --version), pip index as configured"
measure() { # NAME EXTRAS
    local venv="$work/$1" log="$work/$1.log" start end
    rm -rf "$venv"
    "$python" -m venv "$venv"
    start=$(date +%s%N)
    if ! "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check \
        "$root$2" >"$log" 2>&1; then
        cat "$log" >&2
        return 1
    fi
    end=$(date +%s%N)
    printf '%-8s %-38s %5d.%d s  %s  (%d packages)\n' "$1" "pip install '.$2'" \
        $(((end - start) / 1000000000)) $((((end - start) / 100000000) % 10)) \
        "$(du -sh "$venv" | cut -f1)" "$("$venv/bin/pip" list 2>/dev/null | tail -n +3 | wc -l)"
}
measure all "[train,demo,procfile]"
measure runtime ""
