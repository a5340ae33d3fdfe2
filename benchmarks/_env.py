"""Machine, version and commit facts recorded next to every benchmark number."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any

import numpy as np
import torch


def machine_info(watched: list[str], label: str) -> dict[str, Any]:
    """CPU model, cores, versions, commit and date; the commit is marked "(+ uncommitted <label>)" when any of the
    `watched` repo paths has local changes, so a number is never attributed to code it was not measured on."""
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *watched], capture_output=True,
                               text=True).stdout.strip()
        if dirty:
            commit += f" (+ uncommitted {label})"
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "commit": commit,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg()[0],
    }
