"""Run generated code and its tests, each program in its own process, and say whether it passed.

A program runs in a fresh interpreter (``python -I -B``: no user site, no environment
variables, no bytecode written) whose working folder is a new scratch folder that is deleted
afterwards, with limits on memory, CPU time and file size, and with the guards described in
:mod:`.sandbox_child` (no network, no processes, no files outside the scratch folder, no verdict
forged by printing or exiting early). A wall-clock timeout kills the whole process group. Whatever the program does, the caller gets a
verdict string and the run goes on: ``"passed"``, ``"failed: <reason>"`` or ``"timed out ..."``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import CompressedExpertsError

_CHILD = Path(__file__).with_name("sandbox_child.py")
_SIGNALS = {
    signal.SIGXCPU: "timed out (CPU time limit)",
    signal.SIGXFSZ: "failed: wrote more than the file size limit",
    signal.SIGKILL: "failed: killed (out of memory?)",
    signal.SIGSEGV: "failed: crashed (SIGSEGV)",
}
#: Programs run several at a time, one per core; and a BLAS pool of one thread per core (numpy's)
#: reserves memory per thread, which counts against the address-space limit on a many-core machine.
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def check_timeout(timeout: float) -> None:
    """Refuse a timeout no program can meet: with it every program would be "timed out", silently."""
    if not 0 < timeout < math.inf:
        raise CompressedExpertsError(
            f"the timeout is how many seconds each generated program may run: give a positive number "
            f"(e.g. 10), not {timeout!r}",
            settings=("timeout",),
        )


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16) -> str:
    """Run ``program`` (code plus its tests, e.g. asserts) in the sandbox; return its verdict.

    ``timeout`` is wall-clock seconds (CPU time is limited to the same, rounded up); ``memory_mb``
    the address space, ``file_mb`` the largest file it may write (in its scratch folder).
    """
    if os.name != "posix":
        raise CompressedExpertsError("running generated code needs a POSIX system (Linux or macOS)")
    check_timeout(timeout)
    nonce = secrets.token_hex(16)
    job = {"program": program, "nonce": nonce, "memory_mb": memory_mb, "cpu_s": math.ceil(timeout), "file_mb": file_mb}
    scratch = tempfile.mkdtemp(prefix="ce-sandbox-")
    env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", **_ONE_THREAD}
    try:
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", str(_CHILD)],
                cwd=scratch,
                env=env,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                process.communicate(json.dumps(job).encode(), timeout=timeout)
            except BaseException as err:  # a timeout, or the caller interrupted: leave nothing running
                with contextlib.suppress(ProcessLookupError):  # the group: its leader is not yet reaped, so still ours
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                if isinstance(err, subprocess.TimeoutExpired):
                    return f"timed out after {timeout:g} s"
                raise
            output.seek(max(0, output.seek(0, os.SEEK_END) - 65536))
            lines = output.read().decode(errors="replace").splitlines()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    verdicts = [line[len(nonce) + 1 :] for line in lines if line.startswith(nonce + " ")]
    if verdicts:
        return verdicts[-1]
    if process.returncode < 0:
        number = -process.returncode
        return _SIGNALS.get(number, f"failed: killed by signal {signal.Signals(number).name}")
    return f"failed: exited with code {process.returncode} before its tests finished"


def run_programs(
    programs: Sequence[str], timeout: float = 10.0, workers: int | None = None, **limits: int
) -> list[str]:
    """:func:`run_program` for each program, several at a time (one process each); verdicts in order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, **limits), programs))
