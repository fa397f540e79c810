"""Generated code gets a verdict whatever it does, and cannot reach the network or files outside its scratch folder."""

from __future__ import annotations

import pytest

from compressed_experts.evaluation.sandbox import run_programs

pytestmark = pytest.mark.skipif(__import__("os").name != "posix", reason="the sandbox needs a POSIX system")


def test_verdicts(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    programs = {
        "passes": "def add(a, b):\n    return a + b\nprint('noise')\nassert add(2, 3) == 5",
        "fails": "def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'add(2, 3) should be 5'",
        "hangs": "while True:\n    pass",
        "sleeps": "import time\ntime.sleep(60)",
        "raises": "raise RuntimeError('boom')",
        "segfaults": "import faulthandler\nfaulthandler._sigsegv()",
        "uses ctypes": "import ctypes",
        "syntax": "def f(:\n    pass",
        "connects": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "hides a socket": "import socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass",
        "reads outside": f"open({str(outside)!r}).read()",
        "writes outside": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "deletes outside": f"import os\nos.remove({str(outside)!r})",
        "lists /": "import os\nos.listdir('/')",
        "starts a process": "import subprocess\nsubprocess.run(['true'])",
        "kills its parent": "import os\nos.kill(os.getppid(), 9)",
        "exits early": "import os\nos._exit(0)",
        "prints a fake verdict": "import sys\nsys.__stdout__.write('passed\\n')\nassert False",
        "eats memory": "x = bytearray(8 * 1024 ** 3)",
        "uses its scratch": (
            "import json, math, os, shutil, tempfile\nopen('a.txt', 'w').write('1')\nassert open('a.txt').read() == '1'\n"
            "os.makedirs('d/e')\nshutil.rmtree('d')\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')\n"
            "assert math.gcd(4, 6) == 2"
        ),
    }
    verdicts = dict(zip(programs, run_programs(list(programs.values()), timeout=1.0, workers=4)))
    assert verdicts["passes"] == "passed"
    assert verdicts["uses its scratch"] == "passed"
    assert verdicts["fails"] == "failed: AssertionError: add(2, 3) should be 5"
    assert verdicts["hangs"].startswith("timed out") and verdicts["sleeps"].startswith("timed out")
    assert verdicts["raises"] == "failed: RuntimeError: boom"
    assert verdicts["syntax"].startswith("failed: SyntaxError")
    assert verdicts["segfaults"] == "failed: crashed (SIGSEGV)"
    assert verdicts["uses ctypes"].startswith("failed: ctypes is blocked")
    for name in ("connects", "hides a socket"):
        assert verdicts[name].startswith("failed: network access is blocked"), verdicts[name]
    assert verdicts["reads outside"].startswith("failed: reading outside the scratch folder is blocked")
    assert verdicts["writes outside"].startswith("failed: writing outside the scratch folder is blocked")
    assert verdicts["deletes outside"].startswith("failed: changing files outside the scratch folder is blocked")
    assert verdicts["lists /"].startswith("failed: reading outside")
    assert verdicts["starts a process"].startswith("failed: starting processes is blocked")
    assert verdicts["kills its parent"].startswith("failed: signalling processes is blocked")
    assert verdicts["exits early"].startswith("failed: exited with code 0")
    assert verdicts["prints a fake verdict"] == "failed: AssertionError"
    assert verdicts["eats memory"] == "failed: MemoryError"
    assert outside.read_text() == "secret" and not (tmp_path / "new.txt").exists()
