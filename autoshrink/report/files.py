"""Writing tables as files: CSV through a temporary name and ``os.replace``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from autoshrink._files import atomic_path

__all__ = ["write_csv_atomic"]


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (without the index) through a temporary file and ``os.replace``.

    Args:
        df: the table to write.
        path: destination; missing parent folders are created.

    Returns:
        The destination path.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "trials.csv"
        >>> write_csv_atomic(pd.DataFrame({"number": [0, 1]}), out).read_text().splitlines()
        ['number', '0', '1']
    """
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)
