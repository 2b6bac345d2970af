"""The output-folder claims this process holds, and handing one over when its folder is swapped.

The ground floor under :mod:`nanoseek.outdir` (which claims folders and records them in
:data:`HELD`) and :mod:`nanoseek.atomic` (whose ``replace_dir`` swaps a new folder in at a
claimed path and must keep the claim held across the swap): both import this module, neither
imports the other's machinery for it. A claim is an exclusive ``flock`` on an fd of the folder
itself; see :mod:`nanoseek.outdir` for the policy.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# realpath -> [fd, depth] of the claims this process holds
HELD: dict[str, list[int]] = {}


def handover_prepare(dst: Path, new: Path) -> tuple[str, int] | None:
    """Before :func:`nanoseek.atomic.replace_dir` swaps the folder ``new`` in at ``dst``: if this
    process holds ``dst``, lock ``new`` too, so the folder at ``dst`` is never unlocked."""
    key = os.path.realpath(dst)
    if key not in HELD:
        return None
    fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return key, fd


def handover_complete(dst: Path, handover: tuple[str, int] | None) -> None:
    """After the swap: the claim now holds the new folder's lock and releases the old one's."""
    if handover is not None:
        key, fd = handover
        old, HELD[key][0] = HELD[key][0], fd
        os.close(old)


def handover_abort(handover: tuple[str, int] | None) -> None:
    if handover is not None:
        os.close(handover[1])


__all__ = ["HELD", "handover_prepare", "handover_complete", "handover_abort"]
