"""Checkpoint files that survive crashes and load with torch.load(weights_only=True).

Written to a temporary file, fsynced and renamed; every file loads weights-only, official DINO checkpoints through
an allow-list scoped to that one load, so a crafted file cannot run code (docs/training.md, Checkpoints and resume)."""
from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import pathlib
import pickle
import random
import re
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from sparo_dino import distributed
from sparo_dino.io import atomic

CHECKPOINT_NAME = "checkpoint.pth"
_PERIODIC = re.compile(r"checkpoint(\d+)\.pth")  # checkpointNNNN.pth, NNNN = 0-based epoch index


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or of another model."""


def save_checkpoint(state: Mapping[str, Any], path: str) -> None:
    """Write `state` to `path` atomically and durably (temporary file, fsync, rename: io/atomic.py).

    A failed write (full disk, quota, I/O error) removes the temporary file, leaves the previous checkpoint as it
    was and raises a one-line CheckpointError."""
    try:
        with atomic.replaced(path, "wb", durable=True) as handle:
            torch.save(dict(state), handle)
    except BaseException as error:
        cause = _os_error(error)
        if cause is not None:
            kept = "the previous checkpoint is kept" if os.path.isfile(path) else "no checkpoint was written"
            raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}; {kept}") from error
        raise


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write. torch.save reports a full disk as a RuntimeError of its zip writer
    ("unexpected pos ...") raised while handling the OSError of the file write, so the chain is searched."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def periodic_checkpoints(folder: str) -> list[str]:
    """The kept checkpointNNNN.pth files of a run folder, newest (highest epoch index) first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(match[1]), name) for name in os.listdir(folder) if (match := _PERIODIC.fullmatch(name))]
    return [os.path.join(folder, name) for _, name in sorted(found, reverse=True)]


def load_with_fallback(path: str, fallbacks: Sequence[str]) -> tuple[dict[str, Any], str]:
    """Load `path`, or when it is corrupt or truncated, the first loadable file of `fallbacks` (with a warning
    that names both); returns (state, the file it came from). Without a loadable fallback the original error
    stands, so a damaged run is never silently restarted from scratch."""
    try:
        return load_checkpoint(path), path
    except CheckpointError as error:
        for candidate in fallbacks:
            try:
                state = load_checkpoint(candidate)
            except CheckpointError:
                continue
            warnings.warn(f"{error}; falling back to {candidate} (epoch {state.get('epoch')}, iteration "
                          f"{state.get('iteration', 0)}); the next save overwrites {path}", stacklevel=2)
            return state, candidate
        raise


def _official_dino_globals() -> list[tuple[Any, str]]:
    """The few classes and functions official DINO checkpoints pickle, each with the name its pickles use.

    Official main_dino.py saves `args` (an argparse.Namespace; under run_with_submitit its output_dir is a
    pathlib.PosixPath) and an optimizer whose param groups hold numpy float64 lr and weight decay (its schedules
    are numpy arrays); eval_linear.py's checkpoint.pth.tar holds only plain data. Numpy scalars come back through
    numpy's own scalar constructor; files written with numpy 1 name it numpy.core.multiarray.scalar, numpy 2
    moved it to numpy._core, so both names map to the one function. Nothing here can run code: each entry only
    builds a value from values."""
    numpy_scalar = np.float64(0).__reduce__()[0]
    return [(argparse.Namespace, "argparse.Namespace"), (pathlib.PosixPath, "pathlib.PosixPath"),
            (numpy_scalar, "numpy.core.multiarray.scalar"), (numpy_scalar, "numpy._core.multiarray.scalar"),
            (np.dtype, "numpy.dtype"), (type(np.dtype(np.float64)), "numpy.dtypes.Float64DType"),
            (codecs.encode, "_codecs.encode")]  # bytes in protocol-2 pickles; allowed by default from torch 2.5


def _safe_globals(allowed: list[tuple[Any, str]]) -> list[Any]:
    """`allowed` as torch accepts it: (object, pickled name) pairs from torch 2.6; before, bare objects, which
    torch matches under their current module and name only (so numpy-1 scalars need torch >= 2.6 with numpy 2)."""
    if torch.__version__ >= "2.6":
        return list(allowed)
    return list(dict.fromkeys(value for value, _ in allowed))


@contextlib.contextmanager
def _allowing(allowed: list[tuple[Any, str]]) -> Iterator[None]:
    """Let weights_only loads inside the block accept `allowed`, and only there: other loads in the process stay
    as strict as torch's default."""
    entries = _safe_globals(allowed)
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        with torch.serialization.safe_globals(entries):
            yield
        return
    before = list(torch.serialization.get_safe_globals())  # torch 2.4: add, then restore the list by hand
    torch.serialization.add_safe_globals(entries)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _refused_global(error: Exception) -> str | None:
    """The global that torch's weights_only unpickler refused to load, as `module.name`; None for other errors."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    found = re.search(r"GLOBAL (\S+)", str(error))
    return found[1] if found else None


def _reason(error: Exception) -> str:
    """The first line that says what is wrong, past the advice torch puts before its unpickler's own words (its
    advice to retry with weights_only=False would let a crafted file run code, so it never reaches the user)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(". ")[0]  # torch's zip reader goes on with guesses about how the file was damaged
    return line if line and "weights_only" not in line else type(error).__name__


# How files begin: torch.save's zip archive, torch's legacy format (a protocol-2 pickle of its magic number), and
# any other pickle of protocol 2 or later.
_ZIP_HEADER = b"PK\x03\x04"
_LEGACY_HEADER = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_PICKLE_OPCODE = b"\x80"


def _file_kind_problem(path: str, what: str) -> str | None:
    """What is wrong with a file that is not torch.save output at all, or None when it starts as torch.save's do
    (then it is damaged). A pickle written by pickle.dump is not damaged: this tool does not load those."""
    with open(path, "rb") as handle:
        head = handle.read(len(_LEGACY_HEADER))
    if head.startswith(_ZIP_HEADER) or head == _LEGACY_HEADER:
        return None
    if head.startswith(_PICKLE_OPCODE):
        return f"{path} is a plain Python pickle, not a {what} this tool loads (it reads files written by torch.save)"
    return None


def _load_error(path: str, error: Exception, allow_official: bool, what: str = "checkpoint") -> CheckpointError:
    """The one line a user sees for a file torch.load refused."""
    refused = _refused_global(error)
    if refused is None:
        problem = _file_kind_problem(path, what)
        if problem is not None:
            return CheckpointError(problem)
        return CheckpointError(f"{what} {path} is corrupt or truncated ({_reason(error)})")
    if refused in {name for _, name in _official_dino_globals()}:
        if not allow_official:
            return CheckpointError(f"{what} {path} holds pickled Python objects ({refused}: an official DINO "
                                   "checkpoint?); name it explicitly (--resume, --pretrained_weights) to load it")
        return CheckpointError(f"{what} {path} names {refused}, which torch {torch.__version__} can only "
                               "allow under its current name; loading it needs torch >= 2.6")
    return CheckpointError(f"{what} {path} holds objects that are not allowed in a {what} ({refused}); it "
                           "was not loaded, since unpickling them could run code")


def load_plain_data(path: str, what: str = "checkpoint", allow_official: bool = False) -> Any:
    """Whatever torch.save wrote to `path` (tensors and plain data only, weights_only=True), on CPU, or a one-line
    CheckpointError naming the file as `what` ("checkpoint", "feature file") and what is wrong with it.

    Nothing is ever unpickled beyond tensors and plain data, so a crafted file cannot run code. `allow_official`
    also accepts the few safe classes official DINO checkpoints pickle (see _official_dino_globals); pass it for
    a file the user named, while this run's own checkpoints must be plain data."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with _allowing(_official_dino_globals() if allow_official else []), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols say nothing the error does not
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        raise _load_error(path, error, allow_official, what) from error


def load_checkpoint(path: str, allow_official: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict (see load_plain_data), or raise a one-line CheckpointError saying what is wrong."""
    state = load_plain_data(path, "checkpoint", allow_official)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states of all ranks as plain tensors and ints.

    Torch (and CUDA) generators differ per rank (drop-path draws), so they are gathered into one row per rank;
    numpy and Python states are the same code path on every rank and kept from this rank. Collective: call on
    every rank.
    """
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    rng: dict[str, Any] = {
        "torch": _gather_rows(torch.get_rng_state(), device),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "numpy_has_gauss": int(numpy_state[3]),
        "numpy_cached_gauss": float(numpy_state[4]),
        "python_version": int(python_state[0]),
        "python_state": torch.tensor(python_state[1], dtype=torch.int64),
        "python_gauss_next": python_state[2],
    }
    if device.type == "cuda":
        rng["cuda"] = _gather_rows(torch.cuda.get_rng_state(device), device)
    return rng


def _gather_rows(state: torch.Tensor, device: torch.device) -> torch.Tensor:
    return distributed.all_gather_tensor(state.to(device)[None]).cpu()


def restore_rng_state(rng: Mapping[str, Any], rank: int, device: torch.device) -> bool:
    """Restore the states saved by `capture_rng_state`; returns False (nothing restored for torch) when the
    checkpoint was written by fewer ranks than this run has, since those ranks have no saved stream."""
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), int(rng["numpy_pos"]),
                         int(rng["numpy_has_gauss"]), float(rng["numpy_cached_gauss"])))
    random.setstate((int(rng["python_version"]), tuple(int(v) for v in rng["python_state"].tolist()),
                    rng["python_gauss_next"]))
    if rank >= rng["torch"].shape[0]:
        return False
    torch.set_rng_state(rng["torch"][rank].clone())
    if device.type == "cuda" and "cuda" in rng and rank < rng["cuda"].shape[0]:
        torch.cuda.set_rng_state(rng["cuda"][rank].clone(), device)
    return True
