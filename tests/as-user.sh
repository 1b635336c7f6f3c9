#!/usr/bin/env bash
# Run pytest on the given tests once more as an ordinary user would (`make
# test` does this after the main pass when it runs as root, as CI does): root
# without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), so the kernel
# applies every permission bit as it does for an ordinary user. (A real
# unprivileged user cannot run this machine's Python, which lives under /root.)
#   tests/as-user.sh PYTHON TEST...
set -euo pipefail
py=$1; shift
if [ "$(id -u)" != 0 ]; then
  echo "as-user: already an ordinary user; the main pass covered these tests"; exit 0
fi
if ! command -v setpriv >/dev/null; then
  echo "as-user: SKIPPED: needs setpriv (util-linux)"; exit 0
fi
echo "as-user: $* without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH"
exec setpriv --bounding-set=-dac_override,-dac_read_search \
  "$py" -m pytest -q -p no:cacheprovider "$@"
