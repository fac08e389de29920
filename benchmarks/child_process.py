"""Run one measurement in a fresh interpreter and read back its result line (torch-free,
shared by both benchmark drivers)."""

from __future__ import annotations

import json
import subprocess
from typing import Any, Mapping, Sequence


def run_measurement(
    command: Sequence[str], prefix: str, spec: Mapping[str, Any], timeout: float, env: Mapping[str, str]
) -> dict[str, Any]:
    """Run ``command``; return the JSON after ``prefix`` on its stdout, or ``spec`` with an
    ``error`` (timeout, failure to start, or the exit status and the tail of stderr)."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=dict(env))
    except subprocess.TimeoutExpired:
        return dict(spec) | {"error": f"timed out after {timeout:.0f} s"}
    except OSError as error:
        return dict(spec) | {"error": f"could not start: {error}"}
    for line in done.stdout.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :])
    killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
    tail = done.stderr.strip().splitlines()[-3:]
    return dict(spec) | {"error": f"exit {done.returncode}{killed}: {' | '.join(tail)}"}
