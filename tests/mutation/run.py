"""Curated mutation check: apply each bug of tests/mutation/mutations.py to a copy of the repository, one at a time,
run the tests that claim to catch it, and print caught / NOT CAUGHT.

    python tests/mutation/run.py                 # every mutation (make mutation); tens of minutes on 2 cores
    python tests/mutation/run.py resume blur     # the mutations whose name contains one of these words
    python tests/mutation/run.py --list

The copy is a git checkout of HEAD with the working tree laid over it (uncommitted edits and untracked, not ignored
files included). Before the mutations, the union of their tests runs once on the unmutated copy: a test that
already fails would "catch" everything. Exit status 0 only when every selected mutation was caught; a snippet that
is missing or not unique, a selection that collects no test, a broken mutant (collection error) or a run past
--timeout count as failures, so neither the list nor a hanging test can pass silently.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from mutations import MUTATIONS

REPO = Path(__file__).resolve().parents[2]
_FAILED_TEST = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def _git_files(root: Path, *options: str) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", *options], cwd=root, check=True, capture_output=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def copy_repository(root: Path, target: Path) -> None:
    """A git checkout of root's HEAD in the empty folder `target` (runs record their commit in provenance), with
    root's working tree laid over it: tracked and untracked, not ignored files as they are now."""
    subprocess.run(["git", "clone", "-q", "--shared", str(root), str(target)], check=True)
    for name in _git_files(root, "--cached", "--others", "--exclude-standard"):
        if (root / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target / name)
    for name in _git_files(root, "--deleted"):
        (target / name).unlink(missing_ok=True)


def run_pytest(copy: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """(pytest's exit status, or None past `timeout`; its output) for `tests` in the copy, which is what Python
    imports there (PYTHONPATH), not an installed checkout. The whole process group is killed on a time-out."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


def verdict(status: int | None, output: str) -> tuple[str, str]:
    """(result, detail) of one mutant's test run; only "caught" passes."""
    if status is None:
        return "TIMEOUT", "tests ran past --timeout (a hang is not a failure report)"
    if status == 0:
        return "NOT CAUGHT", "all its tests passed"
    if status == 1:
        failed = _FAILED_TEST.search(output)
        return "caught", failed[2] if failed else "a test failed"
    if status == 5:
        return "ERROR", "its test selection collected no test"
    return "ERROR", f"pytest exit status {status} (collection error or broken mutant):\n{output[-2000:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only mutations whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one mutant's tests")
    parser.add_argument("--no_baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = parser.parse_args(argv)
    selected = [m for m in MUTATIONS if not args.words or any(word in m.name for word in args.words)]
    if args.list or not selected:
        for mutation in MUTATIONS:
            print(f"{mutation.name:34s} {mutation.path:32s} {mutation.bug}")
        return 0 if selected else 2

    started = time.monotonic()
    results: list[tuple[str, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
        copy = Path(folder)
        copy_repository(REPO, copy)
        if not args.no_baseline:
            tests = list(dict.fromkeys(test for mutation in selected for test in mutation.tests))
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            status, output = run_pytest(copy, tests, args.timeout * 2)
            if status != 0:
                print(f"baseline FAILED (status {status}): fix the tests before judging mutations\n{output[-3000:]}")
                return 1
            print(f"baseline passed in {time.monotonic() - started:.0f} s", flush=True)
        for index, mutation in enumerate(selected, start=1):
            begin = time.monotonic()
            target = copy / mutation.path
            original = target.read_text()
            try:
                target.write_text(mutation.apply(original))
            except ValueError as error:
                result, detail = "ERROR", str(error)
            else:
                try:
                    result, detail = verdict(*run_pytest(copy, mutation.tests, args.timeout))
                finally:
                    target.write_text(original)
            seconds = time.monotonic() - begin
            results.append((mutation.name, result, seconds, detail))
            print(f"[{index:2d}/{len(selected)}] {result:10s} {seconds:6.1f} s  {mutation.name}: "
                  f"{detail.splitlines()[0] if detail else ''}", flush=True)
            if result == "ERROR" and "\n" in detail:
                print(detail, flush=True)

    survivors = [name for name, result, _, _ in results if result != "caught"]
    print(f"\n{len(results) - len(survivors)}/{len(results)} mutations caught in "
          f"{(time.monotonic() - started) / 60:.1f} min")
    if survivors:
        print("not caught or broken: " + ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
