"""Prefect artifact keys scoped to a folder: Prefect's keys are global, so two pipelines (two
work_dirs, two output folders) must not share one, or their histories mix."""

import hashlib
import os
from pathlib import Path


def scoped_key(prefix: str, folder: str | Path) -> str:
    """``prefix`` + ``-`` + 10 hex digits of the sha256 of the absolute ``folder`` (keys allow only
    lowercase letters, digits and dashes)."""
    digest = hashlib.sha256(os.fsencode(Path(folder).absolute())).hexdigest()[:10]
    return f"{prefix}-{digest}"


__all__ = ["scoped_key"]
