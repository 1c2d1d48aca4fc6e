"""Where peer 2 (``pyrallel-consumer``) can run: it needs Python >= 3.12, the project may be on less.

When the benchmark's own interpreter can import it, that one is used. Otherwise a Python >= 3.12
found on the machine (PATH, then pyenv) gets a side environment ``bench/.venv-pyrallel`` with
``pyrallel-consumer`` and the project's runtime dependencies (the project itself comes from
``PYTHONPATH``, so the peer always runs the current signing and mapping code). Every failure is
returned as a sentence for the report, never raised.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-pyrallel"
PYRALLEL = "pyrallel-consumer==1.0.0"


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_python312() -> str | None:
    candidates = [shutil.which(f"python3.{minor}") for minor in (12, 13, 14)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python")))
    for python in filter(None, candidates):
        version = _version(python)
        if version is not None and version >= (3, 12):
            return python
    return None


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [PYRALLEL, *project["dependencies"]]


def pyrallel_python(log: Path) -> tuple[str | None, str]:
    """(interpreter that can run ``bench/peers/pyrallel_app.py``, how it was found or why not)."""
    if importlib.util.find_spec("pyrallel_consumer") is not None:
        return sys.executable, "installed in the benchmark's environment"
    base = find_python312()
    if base is None:
        return None, (
            f"pyrallel-consumer 1.0.0 requires Python >= 3.12 and this machine has Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} only"
        )
    requirements = _requirements()
    stamp = VENV / ".stamp"
    digest = hashlib.sha256("\n".join([base, *requirements]).encode()).hexdigest()
    python = str(VENV / "bin" / "python")
    if not (stamp.exists() and stamp.read_text() == digest):
        try:
            with open(log, "w") as out:
                subprocess.run([base, "-m", "venv", "--clear", str(VENV)], stdout=out, stderr=out, check=True)
                subprocess.run(
                    [python, "-m", "pip", "install", "--quiet", *requirements],
                    stdout=out,
                    stderr=out,
                    check=True,
                    timeout=600,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            tail = log.read_text(errors="replace")[-300:] if log.exists() else ""
            return None, f"could not install {PYRALLEL} for {base}: {type(exc).__name__} {tail}".strip()
        stamp.write_text(digest)
    return python, f"side environment bench/.venv-pyrallel on {base}"
