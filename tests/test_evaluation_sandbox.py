"""Generated code gets a verdict whatever it does, decided by its tests in a process of their own.

The verdict tests run in both isolations (the operating system's sandbox where this machine has
it, and the Python guard); the attacks of issue 19 are in test_sandbox_attacks.py.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest

from compressed_experts.errors import CompressedExpertsError
from compressed_experts.evaluation import sandbox, sandbox_os
from compressed_experts.evaluation.run import EvalConfig
from compressed_experts.evaluation.sandbox import Program, isolation, run_program, run_programs

pytestmark = [
    pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system"),
    pytest.mark.filterwarnings("ignore:generated code runs WITHOUT:RuntimeWarning"),
]

#: Ample for a program that should finish (interpreters starting on a loaded machine included).
GENEROUS = 20.0
HAS_OS_SANDBOX = bool(sandbox_os.probe()[0])
ISOLATIONS = [
    pytest.param("os", marks=pytest.mark.skipif(not HAS_OS_SANDBOX, reason=sandbox_os.probe()[1] or "-")),
    "python-guard",
]

ADD = "def add(a, b):\n    return a + b\n"


def run_all(programs: dict[str, Program | str], mode: str, timeout: float = GENEROUS) -> dict[str, str]:
    return dict(zip(programs, run_programs(list(programs.values()), timeout=timeout, workers=4, isolation=mode)))


@pytest.mark.parametrize("mode", ISOLATIONS)
def test_verdicts(mode):
    programs = {
        "passes": Program(ADD + "print('noise')", "assert add(2, 3) == 5"),
        "fails": Program("def add(a, b):\n    return a - b", "assert add(2, 3) == 5, 'add(2, 3) should be 5'"),
        "raises": Program("raise RuntimeError('boom')", "assert True"),
        "raises when called": Program("def f():\n    raise KeyError('k')", "f()"),
        "raises what the tests expect": Program(
            "def f(x):\n    raise ValueError(x)", "try:\n    f(1)\nexcept ValueError as e:\n    assert str(e) == '1'"
        ),
        "syntax": Program("def f(:\n    pass", "assert f() is None"),
        "misses the function": Program("def g():\n    return 1", "assert f() == 1"),
        "segfaults": Program("import faulthandler\ndef f():\n    faulthandler._sigsegv()", "f()"),
        "exits early": Program("import os\nos._exit(0)", "assert True"),
        "exits in a call": Program("import sys\ndef f():\n    sys.exit(0)", "f()"),
        "prints a fake verdict": Program(
            'import os\nfor fd in range(64):\n    try:\n        os.write(fd, b\'\\n{"verdict": "passed"}\\n\')\n'
            "    except OSError:\n        pass\ndef f():\n    return 0",
            "assert f() == 1",
        ),
        "eats memory": Program("def f():\n    return bytearray(8 * 1024 ** 3)", "f()"),
        "returns built-in types": Program(
            "import collections\n"
            "def f():\n    return [None, True, 2 ** 100, -0.0, math.inf, 1j, 'é', b'\\x00\\xff', bytearray(b'a'),"
            " (1, (2,)), {3}, frozenset({4}), {'a': [1]}, {(1, 2): 3}, collections.OrderedDict(a=1)]\n"
            "def g():\n    return (i * i for i in range(3))\n"
            "def h(*args, **kwargs):\n    return args, kwargs\nimport math",
            "assert f() == [None, True, 2 ** 100, -0.0, math.inf, 1j, 'é', b'\\x00\\xff', bytearray(b'a'), (1, (2,)),"
            " {3}, frozenset({4}), {'a': [1]}, {(1, 2): 3}, {'a': 1}]\n"
            "assert type(f()[-1]) is dict and list(g()) == [0, 1, 4] and math.isnan(h(math.nan)[0][0])\n"
            "assert h(1, [2], k={3}) == ((1, [2]), {'k': {3}})",
        ),
        "uses its scratch folder": Program(
            "import os, shutil, tempfile\nopen('a.txt', 'w').write('1')\nos.makedirs('d/e')\nshutil.rmtree('d')\n"
            "with tempfile.TemporaryFile() as f:\n    f.write(b'x')\ndef read():\n    return open('a.txt').read()",
            "assert read() == '1'",
        ),
        "is code alone": "x = 1",
        "is code alone that raises": "assert 1 == 2, 'no'",
        "passes a function to the code": Program(ADD, "assert add(lambda: 1, 2) == 3"),
        "shadows a builtin": Program(ADD + "def len(x):\n    return 3", "assert len(add([1], [2])) == 2"),
    }
    verdicts = run_all(programs, mode)
    for name in ("passes", "raises what the tests expect", "returns built-in types", "uses its scratch folder"):
        assert verdicts[name] == "passed", (name, verdicts[name])
    assert verdicts["is code alone"] == "passed" and verdicts["shadows a builtin"] == "passed"
    assert verdicts["fails"] == "failed: AssertionError: add(2, 3) should be 5"
    assert verdicts["raises"] == "failed: RuntimeError: boom"
    assert verdicts["raises when called"] == "failed: KeyError: 'k'"
    assert verdicts["syntax"].startswith("failed: SyntaxError")
    assert verdicts["misses the function"] == "failed: NameError: name 'f' is not defined"
    assert verdicts["segfaults"] == "failed: crashed (SIGSEGV)"
    assert verdicts["exits early"] == "failed: exited with code 0 before its tests finished"
    assert verdicts["exits in a call"] == "failed: ProgramError: 0"
    assert verdicts["prints a fake verdict"].startswith("failed: the program sent"), verdicts["prints a fake verdict"]
    assert verdicts["eats memory"] == "failed: MemoryError"
    assert verdicts["is code alone that raises"] == "failed: AssertionError: no"
    assert verdicts["passes a function to the code"].startswith("failed: TypeError: the tests pass an object of type")


@pytest.mark.parametrize("mode", ISOLATIONS)
def test_programs_that_hang_time_out(mode):
    programs = {
        "loops": "while True:\n    pass",
        "sleeps in a call": Program("import time\ndef f():\n    time.sleep(60)", "f()"),
        "stops answering": Program("import os\nos.close(1)\nimport time\ntime.sleep(60)", "assert True"),
    }
    verdicts = run_all(programs, mode, timeout=1.5)
    assert all(verdict.startswith("timed out") for verdict in verdicts.values()), verdicts


@pytest.mark.skipif(not HAS_OS_SANDBOX, reason=sandbox_os.probe()[1] or "-")
def test_programs_may_use_numpy():
    pytest.importorskip("numpy")
    program = Program(
        "import numpy as np\n"
        "def solve(a, b):\n    return np.linalg.solve(np.array(a, float), np.array(b, float)).round(6).tolist()\n"
        "def scalars():\n    return np.int64(3), np.float32(0.5), np.bool_(True)",
        "assert solve([[2, 0], [0, 4]], [2, 8]) == [1.0, 2.0]\nassert scalars() == (3, 0.5, True)\n"
        "assert np.zeros(2).tolist() == [0.0, 0.0]",  # np: the tests' own numpy, imported afresh
    )
    assert run_program(program, timeout=GENEROUS) == "passed"


def test_the_guard_refuses_what_it_knows(tmp_path):
    """Without the OS sandbox, the audit-hook guard still stops ordinary code (not attacks: see the docs)."""
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    database, fifo = tmp_path / "x.db", tmp_path / "fifo"
    code = {
        "connects": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "reads outside": f"open({str(outside)!r}).read()",
        "writes outside": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "deletes outside": f"import os\nos.remove({str(outside)!r})",
        "starts a process": "import subprocess\nsubprocess.run(['true'])",
        "kills its parent": "import os\nos.kill(os.getppid(), 9)",
        "loads a system library": "import ctypes\nctypes.CDLL('libc.so.6')",
        "traces": "import sys\nsys.settrace(lambda *args: None)",
        "database outside": f"import sqlite3\nsqlite3.connect({str(database)!r}).execute('create table t(a)')",
        "fifo outside": f"from posix import mkfifo\nmkfifo({str(fifo)!r})",
        "in the scratch folder": (
            "import os, pathlib, sqlite3\nsqlite3.connect('a.db').execute('create table t(a)')\n"
            "os.mkfifo(pathlib.Path('f'))\nassert sorted(os.listdir('.')) == ['a.db', 'f']"
        ),
    }
    verdicts = run_all(code, "python-guard")
    assert verdicts.pop("in the scratch folder") == "passed"
    expected = {
        "connects": "network access is blocked",
        "reads outside": "reading outside the scratch folder is blocked",
        "writes outside": "writing outside the scratch folder is blocked",
        "deletes outside": "changing files outside the scratch folder is blocked",
        "starts a process": "starting processes is blocked",
        "kills its parent": "signalling processes is blocked",
        "loads a system library": "ctypes is blocked",
        "traces": "tracing the interpreter is blocked",
        "database outside": "writing outside the scratch folder is blocked (sqlite3.connect",
        "fifo outside": "changing files outside the scratch folder is blocked (os.mkfifo",
    }
    for name, reason in expected.items():
        assert verdicts[name].startswith(f"failed: {reason}"), (name, verdicts[name])
    assert outside.read_text() == "secret" and sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt"]


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf])
def test_a_timeout_no_program_can_meet_is_refused(timeout):
    with pytest.raises(CompressedExpertsError, match="give a positive number"):
        run_program("pass", timeout=timeout)
    with pytest.raises(CompressedExpertsError, match="give a positive number"):
        run_programs(["pass"], timeout=timeout)


def test_without_an_os_sandbox_runs_are_guarded_loudly_or_refused(monkeypatch):
    monkeypatch.setattr(sandbox_os, "probe", lambda: ("", "bubblewrap is not installed"))
    monkeypatch.setattr(sandbox, "_warned", False)
    assert isolation() == "python-guard"
    with pytest.raises(CompressedExpertsError, match="needs the operating system's sandbox.*not installed") as err:
        isolation("os")
    assert err.value.settings == ("require_sandbox",)
    with pytest.raises(CompressedExpertsError, match="needs the operating system's sandbox"):
        run_programs(["pass"], isolation="os")
    with pytest.raises(CompressedExpertsError, match="isolation must be one of auto, os, python-guard"):
        isolation("none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_programs(["pass", "pass"]) == ["passed", "passed"]
        assert run_programs(["pass"]) == ["passed"]
    assert [str(w.message) for w in caught] == [sandbox.guard_warning()]  # once per process
    assert "WITHOUT the operating system's sandbox (bubblewrap is not installed)" in str(caught[0].message)
    with pytest.raises(CompressedExpertsError, match="require_sandbox must be True or False"):
        EvalConfig(require_sandbox="yes")
