"""Files replaced whole: written under a temporary name beside the target, then renamed over it.

A reader (a resumed run, another driver, a script parsing results) sees the old file or the new one, never half of
one; a writer killed midway leaves only a temporary, named `.<name>.tmp.<pid>`, that `remove_stale_temporaries`
recognises and the next start of a run deletes."""
from __future__ import annotations

import contextlib
import os
import re
from typing import IO, Iterator

_TEMPORARY = re.compile(r"\..+\.tmp\.\d+")


def temporary_path(path: str | os.PathLike[str]) -> str:
    """Where `replaced` writes before its rename: the same folder (a rename across file systems is not atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp.{os.getpid()}")


@contextlib.contextmanager
def replaced(path: str | os.PathLike[str], mode: str = "w", *, durable: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on any exception it is removed.

    durable: fsync the file before the rename and the folder after it, so the new file also survives a power
    loss (checkpoints); without it a crash of the machine may keep the old file, which is enough elsewhere."""
    if mode not in ("w", "wb"):
        raise ValueError(f"replaced() writes a whole file: mode 'w' or 'wb', not {mode!r}")
    temporary = temporary_path(path)
    os.makedirs(os.path.dirname(temporary), exist_ok=True)
    try:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    if durable:
        folder = os.open(os.path.dirname(temporary), os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete temporary files that killed writers left behind (they can be as large as a checkpoint); returns them.

    Call before this run writes anything into `folder`: it assumes no other process is writing there."""
    if not os.path.isdir(folder):
        return []
    stale = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if _TEMPORARY.fullmatch(name) and not name.endswith(f".tmp.{os.getpid()}")]
    for path in stale:
        os.remove(path)
    return stale
