"""Run generated code against its tests, each run in sandboxed processes, and say whether it passed.

A run is a :class:`Program`: the generated ``code`` (untrusted), and the ``tests`` and their
``setup`` (trusted: they come from the data set). They run in two processes of their own,
started by :mod:`.sandbox_child`, which talk over a pair of pipes:

* the program's process runs the code, then calls its functions when the tests ask;
* the tests' process runs the tests in an interpreter the code never touches, with each name
  they take from the code standing in for a call to the program's process, and values crossing
  as plain data serialised by type. It alone reports the verdict, on a pipe that only this
  process (the evaluating one) holds.

So the verdict cannot be forged from inside the code: patching the child's functions, its
``sys.audit``, walking frames, returning an object whose ``__eq__`` is always true or patching
``builtins.abs`` all act on the program's process, which only ever hands back data.

Where the system has it (Linux with bubblewrap: :mod:`.sandbox_os`), each process runs in the
operating system's sandbox: no network, its own PID namespace, a read-only file system that
holds only what Python needs, a scratch folder that is a small ``tmpfs`` of its own, a seccomp
filter against new processes, and death with the evaluating process. Elsewhere the program's
process runs under an audit-hook guard that Python code can get around (``"python-guard"``):
this is warned about, recorded in the results, and refused with ``isolation="os"``
(``--require-sandbox`` on the command line). Whatever a program does, the caller gets a verdict
string and the run goes on: ``"passed"``, ``"failed: <reason>"`` or ``"timed out ..."``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressedExpertsError
from . import sandbox_os

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
#: What a caller may ask for: the best there is, the OS sandbox or nothing, or the guard alone.
ISOLATIONS = ("auto", "os", "python-guard")
#: The isolation recorded where the operating system gives no sandbox.
PYTHON_GUARD = "python-guard"
GUARD_WARNING = (
    "generated code runs WITHOUT the operating system's sandbox ({reason}): only a Python audit hook "
    "guards it, which code can get around to reach files, the network and other processes. Install "
    "bubblewrap (Linux) to run it isolated, or refuse to run it unisolated with --require-sandbox "
    "(isolation='os')."
)
_SCRATCH_PREFIX = "ce-sandbox-"
#: The children start without ``site`` (-S), whose .pth files can cost more than the rest of a
#: run; they find the installed packages (numpy) here instead: the installation's own folders of
#: packages, not the folders that editable installs add.
_PACKAGES = os.pathsep.join(
    p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)
)


@dataclass(frozen=True)
class Program:
    """One run: generated ``code`` and the ``tests`` that judge it.

    ``code`` runs in the program's process. ``setup`` then ``tests`` run in the tests' process
    (HumanEval's prompt, for its helper functions, and its ``check``; MBPP's set-up code and
    asserts); each name in ``calls`` is bound there to a stand-in that calls the code's object of
    that name. By default ``calls`` is every name the tests use that neither they, the setup nor
    Python's builtins define, so a program cannot shadow ``abs`` for the tests. The code passes
    when it runs without raising and the tests then run to their end.
    """

    code: str
    tests: str = ""
    setup: str = ""
    calls: tuple[str, ...] | None = None


def check_timeout(timeout: float) -> None:
    """Refuse a timeout no program can meet: with it every program would be "timed out", silently."""
    if not 0 < timeout < math.inf:
        raise CompressedExpertsError(
            f"the timeout is how many seconds each generated program may run: give a positive number "
            f"(e.g. 10), not {timeout!r}",
            settings=("timeout",),
        )


def isolation(requested: str = "auto") -> str:
    """The isolation programs get here: ``"bubblewrap+seccomp"``, ``"bubblewrap"`` (an
    architecture without the seccomp filter) or ``"python-guard"`` (no OS sandbox).

    ``requested`` is one of :data:`ISOLATIONS`; ``"os"`` raises where there is no OS sandbox.
    """
    if requested not in ISOLATIONS:
        raise CompressedExpertsError(
            f"isolation must be one of {', '.join(ISOLATIONS)}, not {requested!r}", settings=("isolation",)
        )
    if requested == PYTHON_GUARD:
        return PYTHON_GUARD
    found, reason = sandbox_os.probe()
    if found:
        return found
    if requested == "os":
        raise CompressedExpertsError(
            f"running generated code needs the operating system's sandbox, and there is none: {reason}; "
            f"without --require-sandbox it runs under a Python guard that code can get around",
            settings=("require_sandbox",),
        )
    return PYTHON_GUARD


def guard_warning() -> str:
    """What to tell the user when programs run under the Python guard alone."""
    return GUARD_WARNING.format(reason=sandbox_os.probe()[1] or "isolation='python-guard' was asked for")


_warned = False


def isolation_of_runs(requested: str = "auto") -> str:
    """:func:`isolation`, with a warning (once per process) where it is the Python guard alone."""
    global _warned
    found = isolation(requested)
    if found == PYTHON_GUARD and not _warned:
        _warned = True
        warnings.warn(guard_warning(), RuntimeWarning, stacklevel=3)
    return found


def run_program(
    program: Program | str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    *,
    isolation: str = "auto",
) -> str:
    """Run ``program`` in the sandbox; return its verdict.

    A string is code without tests: it passes when it runs without raising, which is the code's
    own say (its asserts prove nothing a program cannot fake); give a :class:`Program` with tests
    for a verdict the code cannot forge. ``timeout`` is wall-clock seconds for the whole run (CPU
    time is limited to the same, rounded up, per process); ``memory_mb`` the address space of each
    process, ``file_mb`` the largest file it may write (in its scratch folder, which holds at most
    four times that). ``isolation`` is one of :data:`ISOLATIONS`.
    """
    if os.name != "posix":
        raise CompressedExpertsError("running generated code needs a POSIX system (Linux or macOS)")
    check_timeout(timeout)
    return _Run(
        _as_program(program), timeout, (memory_mb, math.ceil(timeout), file_mb), _isolation(isolation)
    ).verdict()


def run_programs(
    programs: Sequence[Program | str],
    timeout: float = 10.0,
    workers: int | None = None,
    *,
    isolation: str = "auto",
    **limits: int,
) -> list[str]:
    """:func:`run_program` for each program, several at a time; verdicts in order. Warns (once per
    process: :func:`isolation_of_runs`) where the programs run under the Python guard alone."""
    check_timeout(timeout)
    isolation_of_runs(isolation)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, isolation=isolation, **limits), programs))


def _isolation(requested: str) -> str:
    found = isolation(requested)
    if found == PYTHON_GUARD:
        _sweep_scratch_folders()
    return found


def _as_program(program: Program | str) -> Program:
    if isinstance(program, Program):
        return program
    if isinstance(program, str):
        return Program(program)
    raise CompressedExpertsError(f"a program is code (str) or a Program, not {type(program).__name__}")


_swept = False


def _sweep_scratch_folders() -> None:
    """Remove the scratch folders of evaluating processes that died before they could (Python guard
    only: the OS sandbox keeps its scratch folders in memory, gone with the process)."""
    global _swept
    if _swept:
        return
    _swept = True
    for folder in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*-*"):
        match = re.fullmatch(rf"{_SCRATCH_PREFIX}(\d+)-.*", folder.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # alive, someone else's


class _Run:
    """One program's two processes, from their start to the verdict; nothing of them outlives it."""

    def __init__(self, program: Program, timeout: float, limits: tuple[int, int, int], isolation: str) -> None:
        self.program, self.timeout, self.limits, self.isolation = program, timeout, limits, isolation
        self.guarded = isolation == PYTHON_GUARD
        self.processes: list[subprocess.Popen] = []
        self.scratch: str | None = None

    def verdict(self) -> str:
        job = {
            "code": self.program.code,
            "tests": self.program.tests,
            "setup": self.program.setup,
            "calls": None if self.program.calls is None else list(self.program.calls),
        }
        try:
            if self.guarded:
                self.scratch = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")
            to_program, to_tests = os.pipe(), os.pipe()
            try:
                program = self._start("program", stdin=to_program[0], stdout=to_tests[1])
                tests = self._start(
                    "tests", stdin=subprocess.PIPE, stdout=subprocess.PIPE, fds=(to_program[1], to_tests[0])
                )
            finally:
                for fd in (*to_program, *to_tests):
                    os.close(fd)
            deadline = time.monotonic() + self.timeout
            try:
                output, _ = tests.communicate(json.dumps(job).encode(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                return f"timed out after {self.timeout:g} s"
            report = _last_report(output)
            if report is None:
                return self._ended(tests.returncode, "failed: the tests' process ended without a verdict (code {})")
            if "died" not in report:
                return report["verdict"]
            try:  # the program's process ended or closed its end: how?
                program.wait(timeout=max(0.2, min(2.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                return "failed: the program stopped answering the tests"
            return self._ended(program.returncode, "failed: exited with code {} before its tests finished")
        finally:  # a timeout, an answer, or the caller interrupted: leave nothing running
            for process in self.processes:
                _end(process, group=self.guarded)
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _start(self, role: str, stdin, stdout, fds: tuple[int, ...] = ()) -> subprocess.Popen:
        memory_mb, cpu_s, file_mb = self.limits
        parent = os.getpid() if self.guarded else 0  # the OS sandbox kills it with its parent itself
        command = [
            sys.executable,
            "-I",
            "-S",
            "-B",
            str(_CHILD),
            role,
            str(memory_mb),
            str(cpu_s),
            str(file_mb),
            str(parent),
        ]
        command += ["guard" if self.guarded else "-", *map(str, fds)]
        home = self.scratch if self.guarded else sandbox_os.SCRATCH
        env = {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "CE_SANDBOX_PACKAGES": _PACKAGES}
        env.update(_ONE_THREAD)
        seccomp = None
        if not self.guarded:
            seccomp = sandbox_os.seccomp_pipe(sandbox_os.seccomp_filter() if "seccomp" in self.isolation else None)
            bwrap = shutil.which("bwrap") or "bwrap"
            command = sandbox_os.bubblewrap_command(bwrap, 4 * file_mb << 20, seccomp, command, (str(_CHILD),))
            fds = (*fds, *(() if seccomp is None else (seccomp,)))
        try:
            process = subprocess.Popen(
                command,
                cwd=self.scratch,
                env=env,
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                pass_fds=fds,
                start_new_session=True,
            )
        finally:
            if seccomp is not None:
                os.close(seccomp)
        self.processes.append(process)
        return process

    def _ended(self, code: int, otherwise: str) -> str:
        """The verdict on a process that ended with ``code`` (bubblewrap reports a signal as 128 + it):
        the signal's, else ``otherwise`` with the code."""
        number = -code if code < 0 else code - 128 if code > 128 and not self.guarded else 0
        if number:
            with contextlib.suppress(ValueError):
                return _SIGNALS.get(number, f"failed: killed by signal {signal.Signals(number).name}")
        return otherwise.format(code)


def _last_report(output: bytes) -> dict | None:
    for line in reversed(output.decode(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            report = json.loads(line)
            if isinstance(report, dict) and ("died" in report or isinstance(report.get("verdict"), str)):
                return report
    return None


def _end(process: subprocess.Popen, group: bool) -> None:
    """Kill ``process`` and its group (with the OS sandbox, the whole sandbox dies with it; under the
    guard alone, ``group`` kills what the program started even after it ended, best effort)."""
    if process.poll() is None or group:
        with contextlib.suppress(
            ProcessLookupError, PermissionError
        ):  # the group: its leader is not yet reaped, so still ours
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()
