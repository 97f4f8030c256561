"""Where the parity fixtures are: $GLM4VOICE_PARITY_DIR, else the copy vendored in tests/fixtures/parity.

Resolved here once (collection-time parametrisation needs a plain function; conftest's `parity_dir`
fixture returns the same path). A missing fixture is a failure, never a skip: a wrong
GLM4VOICE_PARITY_DIR must not pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

VENDORED = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


def parity_dir() -> Path:
    return Path(os.environ.get("GLM4VOICE_PARITY_DIR") or VENDORED)


def stage_dir(stage: str, marker: str) -> Path:
    """The fixture folder of one stage; raises if `marker` (a file every set has) is not in it."""
    folder = parity_dir() / stage
    if not (folder / marker).is_file():
        raise FileNotFoundError(
            f"no {stage} parity fixture at {folder} (no {marker}): set GLM4VOICE_PARITY_DIR"
        )
    return folder
