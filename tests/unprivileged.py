"""Running resync as an ordinary user from tests that may run as root.

As root, the command runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
(``setpriv``), so the kernel applies the owner's permission bits exactly as
for an ordinary user (the user still owns the files root made). As an
ordinary user (``make test`` runs part of the suite that way too) it runs as
it is."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

AS_USER = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])
needs_setpriv = pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                                   reason="as root, dropping CAP_DAC_OVERRIDE needs setpriv (util-linux)")


def resync_as_user(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_USER, sys.executable, "-m", "resync", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
