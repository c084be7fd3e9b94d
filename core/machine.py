"""Which CPU this is, for choices measured per machine and for benchmark reports (no torch
imported here)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers (virtual machines often name
    every generation of a vendor's CPUs alike, e.g. "AMD EPYC")."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return os.uname().machine
    fields = {key: re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
              for key in ("model name", "cpu family", "model")}
    name = fields["model name"][1].strip() if fields["model name"] else os.uname().machine
    if fields["cpu family"] and fields["model"]:
        name += f" family {fields['cpu family'][1].strip()} model {fields['model'][1].strip()}"
    return name
