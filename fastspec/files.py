"""Small file helpers shared by every layer (drafter folders, checkpoints, pseudo-datasets)."""
from __future__ import annotations

import os


def atomic_write_text(path: str, text: str) -> None:
    """Write-then-rename, fsynced: readers (and a resumed run) never see a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
