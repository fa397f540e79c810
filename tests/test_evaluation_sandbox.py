"""Generated code gets a verdict whatever it does, and cannot reach the network or files outside its scratch folder."""

from __future__ import annotations

import math
import os

import pytest

from compressed_experts.errors import CompressedExpertsError
from compressed_experts.evaluation.sandbox import run_program, run_programs

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")

#: Ample for a program that should finish (an interpreter starting on a loaded machine included).
GENEROUS = 20.0

#: Walks up every frame, takes every 32-hex-digit string in their variables for the nonce, and prints it as passed.
FORGER = """
import os, re, sys
found, frame = set(), sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        for text in (value.values() if isinstance(value, dict) else [value]):
            found.update(re.findall(r"[0-9a-f]{32}", text) if isinstance(text, str) else ())
    frame = frame.f_back
for nonce in found:
    os.write(1, f"\\n{nonce} passed\\n".encode())
os._exit(0)
"""


def test_verdicts(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    programs = {
        "passes": "def add(a, b):\n    return a + b\nprint('noise')\nassert add(2, 3) == 5",
        "fails": "def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'add(2, 3) should be 5'",
        "raises": "raise RuntimeError('boom')",
        "segfaults": "import faulthandler\nfaulthandler._sigsegv()",
        "loads a system library": "import ctypes\nctypes.CDLL('libc.so.6')",
        "calls C": "import ctypes\nctypes.pythonapi.Py_GetVersion",
        "syntax": "def f(:\n    pass",
        "connects": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "hides a socket": "import socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass",
        "reads outside": f"open({str(outside)!r}).read()",
        "writes outside": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "deletes outside": f"import os\nos.remove({str(outside)!r})",
        "lists /": "import os\nos.listdir('/')",
        "starts a process": "import subprocess\nsubprocess.run(['true'])",
        "kills its parent": "import os\nos.kill(os.getppid(), 9)",
        "traces": "import sys\nsys.settrace(lambda *args: None)",
        "exits early": "import os\nos._exit(0)",
        "prints a fake verdict": "import sys\nsys.__stdout__.write('passed\\n')\nassert False",
        "forges a verdict": FORGER,
        "raises the verdict event": "import sys\nsys.audit('compressed_experts.sandbox.verdict', 'passed')",
        "eats memory": "x = bytearray(8 * 1024 ** 3)",
        "uses its scratch": (
            "import json, math, os, shutil, tempfile\nopen('a.txt', 'w').write('1')\nassert open('a.txt').read() == '1'\n"
            "os.makedirs('d/e')\nshutil.rmtree('d')\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')\n"
            "assert math.gcd(4, 6) == 2"
        ),
    }
    verdicts = dict(zip(programs, run_programs(list(programs.values()), timeout=GENEROUS, workers=4)))
    assert verdicts["passes"] == "passed"
    assert verdicts["uses its scratch"] == "passed"
    assert verdicts["fails"] == "failed: AssertionError: add(2, 3) should be 5"
    assert verdicts["raises"] == "failed: RuntimeError: boom"
    assert verdicts["syntax"].startswith("failed: SyntaxError")
    assert verdicts["segfaults"] == "failed: crashed (SIGSEGV)"
    assert verdicts["loads a system library"] == "failed: ctypes is blocked (ctypes.dlopen libc.so.6)"
    assert verdicts["calls C"] == "failed: ctypes is blocked (ctypes.dlsym)"
    for name in ("connects", "hides a socket"):
        assert verdicts[name].startswith("failed: network access is blocked"), verdicts[name]
    assert verdicts["reads outside"].startswith("failed: reading outside the scratch folder is blocked")
    assert verdicts["writes outside"].startswith("failed: writing outside the scratch folder is blocked")
    assert verdicts["deletes outside"].startswith("failed: changing files outside the scratch folder is blocked")
    assert verdicts["lists /"].startswith("failed: reading outside")
    assert verdicts["starts a process"].startswith("failed: starting processes is blocked")
    assert verdicts["kills its parent"].startswith("failed: signalling processes is blocked")
    assert verdicts["traces"] == "failed: tracing the interpreter is blocked (sys.settrace)"
    assert verdicts["exits early"].startswith("failed: exited with code 0")
    assert verdicts["prints a fake verdict"] == "failed: AssertionError"
    assert verdicts["forges a verdict"].startswith("failed: exited with code 0")  # it found no nonce
    assert verdicts["raises the verdict event"] == "failed: reporting a verdict is blocked"
    assert verdicts["eats memory"] == "failed: MemoryError"
    assert outside.read_text() == "secret" and not (tmp_path / "new.txt").exists()


def test_programs_that_hang_time_out():
    verdicts = run_programs(["while True:\n    pass", "import time\ntime.sleep(60)"], timeout=1.0, workers=2)
    assert all(verdict.startswith("timed out") for verdict in verdicts), verdicts


def test_databases_and_fifos_only_in_the_scratch_folder(tmp_path):
    database, fifo, node = tmp_path / "x.db", tmp_path / "fifo", tmp_path / "node"
    programs = {
        "database outside": f"import sqlite3\nsqlite3.connect({str(database)!r}).execute('create table t(a)')",
        "database URI outside": f"import sqlite3\nsqlite3.connect('file:{database}?mode=rwc', uri=True)",
        "fifo outside": f"import os\nos.mkfifo({str(fifo)!r})",
        "fifo imported from posix": f"from posix import mkfifo\nmkfifo({str(fifo)!r})",
        "node outside": f"import os\nos.mknod({str(node)!r})",
        "in the scratch folder": (
            "import os, pathlib, sqlite3, stat\n"
            "for name in (':memory:', 'a.db', pathlib.Path('b.db'), 'file:c.db?mode=rwc'):\n"
            "    sqlite3.connect(name, uri=True).execute('create table t(a)')\n"
            "os.mkfifo(pathlib.Path('f'))\nos.mknod('n')\n"
            "assert sorted(os.listdir('.')) == ['a.db', 'b.db', 'c.db', 'f', 'n'], os.listdir('.')\n"
            "assert stat.S_ISFIFO(os.stat('f').st_mode)"
        ),
    }
    verdicts = dict(zip(programs, run_programs(list(programs.values()), timeout=GENEROUS, workers=4)))
    assert (
        verdicts["database outside"]
        == f"failed: writing outside the scratch folder is blocked (sqlite3.connect {database})"
    )
    assert verdicts["database URI outside"].startswith("failed: writing outside the scratch folder is blocked (sqlite3")
    assert (
        verdicts["fifo outside"] == f"failed: changing files outside the scratch folder is blocked (os.mkfifo {fifo})"
    )
    assert verdicts["fifo imported from posix"] == verdicts["fifo outside"]
    assert verdicts["node outside"] == f"failed: changing files outside the scratch folder is blocked (os.mknod {node})"
    assert verdicts["in the scratch folder"] == "passed"
    assert list(tmp_path.iterdir()) == []


def test_programs_may_use_numpy():
    pytest.importorskip("numpy")
    program = (
        "import numpy as np\n"
        "def solve(a, b):\n    return np.linalg.solve(np.array(a, float), np.array(b, float)).round(6).tolist()\n"
        "assert solve([[2, 0], [0, 4]], [2, 8]) == [1.0, 2.0]"
    )
    assert run_program(program, timeout=GENEROUS) == "passed"


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf])
def test_a_timeout_no_program_can_meet_is_refused(timeout):
    with pytest.raises(CompressedExpertsError, match="give a positive number"):
        run_program("pass", timeout=timeout)
    with pytest.raises(CompressedExpertsError, match="give a positive number"):
        run_programs(["pass"], timeout=timeout)
