"""The child side of :mod:`.sandbox`: run one program under limits and guards, report one verdict.

Started as ``python -I -B sandbox_child.py`` in a fresh scratch folder, never imported: it uses
the standard library only, and reads its job as JSON from stdin (``program``, ``nonce``,
``memory_mb``, ``cpu_s``, ``file_mb``). It prints its verdict as the line ``<nonce> <verdict>``,
so that nothing the program prints, and no early exit of the program, can pass for a verdict.

The guard is an audit hook (PEP 578), which Python offers no way to remove. On the first
forbidden action (a socket, a new process, a signal to another process, tracing the interpreter,
a write anywhere but the scratch folder, SQLite databases and FIFOs included, a read outside it
and outside the Python installation that imports need, ``ctypes`` beyond loading the
installation's own libraries), it reports the failure and ends the process at once, so the
program cannot catch it and carry on.

Only the guard knows the nonce, and it writes a verdict only for the event that :func:`main`
itself raises once the program has returned or raised: no frame the program can walk up to
holds the nonce, and raising that event from anywhere else is refused.

What remains possible: code of the program that runs while the guard does (a signal handler, a
path-like object given to ``sqlite3.connect``) can walk up to the guard's variables, and
``ctypes`` can read and write the process's memory, either way to the nonce; SQL's ``ATTACH`` and
``VACUUM INTO`` open database files that no audit event reports; a program that reloads the
``posix`` module gets back an unguarded ``mkfifo``. So this stops accidents and ordinary code,
not a determined attacker: run code from models you do not trust inside a container as well.
"""

import functools
import io
import json
import os
import resource
import sys
import urllib.parse

#: Audit events refused outright, by prefix, with the reason reported.
_FORBIDDEN = {
    "socket.": "network access is blocked",
    "subprocess.": "starting processes is blocked",
    "os.system": "starting processes is blocked",
    "os.exec": "starting processes is blocked",
    "os.posix_spawn": "starting processes is blocked",
    "os.spawn": "starting processes is blocked",
    "os.fork": "starting processes is blocked",
    "pty.": "starting processes is blocked",
    "os.kill": "signalling processes is blocked",
    "signal.pthread_kill": "signalling processes is blocked",
    "ctypes.": "ctypes is blocked",  # but for ctypes.dlopen, judged by the library it opens
    "sqlite3.enable_load_extension": "loading native code is blocked",
    "sqlite3.load_extension": "loading native code is blocked",
    "resource.": "changing resource limits is blocked",
    "gc.get_": "inspecting the interpreter's objects is blocked",
    "sys.settrace": "tracing the interpreter is blocked",  # a tracer may move any frame to another line
    "sys.setprofile": "tracing the interpreter is blocked",
    "sys.monitoring.register_callback": "tracing the interpreter is blocked",
}
#: Events that change the file system: (path argument, its dir_fd argument or None) for each path.
_CHANGES = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
    "os.mkfifo": ((0, 1),),
    "os.mknod": ((0, 1),),  # raised by the wrappers of _audit_file_creation
}
#: Events that read the file system (a path as first argument).
_READS = ("os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.listxattr", "os.getxattr")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
#: The event by which :func:`main` hands the guard the program's verdict.
_VERDICT = "compressed_experts.sandbox.verdict"


def _where(path, dir_fd=None) -> str | None:
    """The real location of ``path`` (an open descriptor, or a path relative to ``dir_fd`` or the
    working folder), or None where it cannot be told."""
    try:
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
        return os.path.realpath(os.path.join(base, os.fsdecode(path)))
    except (OSError, TypeError, ValueError):
        return None


def _inside(location: str | None, roots: tuple[str, ...]) -> bool:
    return location is not None and any(location == r or location.startswith(r + os.sep) for r in roots)


def _database_file(name) -> str | None:
    """The file a SQLite database name opens, or None for a database in memory or a temporary one
    (which SQLite keeps in TMPDIR, the scratch folder). A ``file:`` name is read as the URI it is
    where URIs are on: the connect event does not say whether they are, so the stricter reading."""
    name = os.fsdecode(name)
    if name.startswith("file:"):
        uri = urllib.parse.urlsplit(name)
        if "memory" in urllib.parse.parse_qs(uri.query).get("mode", []):
            return None
        name = urllib.parse.unquote(uri.path)
    return None if name in ("", ":memory:") else name


def _installed_library(library, installed: tuple[str, ...], scratch: str) -> bool:
    """Whether ``ctypes.dlopen(library)`` opens the interpreter itself (None: what ``import ctypes``
    does, and numpy imports ctypes) or a library of the Python installation, as packages do; not a
    library that the system finds by name, nor one the program wrote."""
    if library is None:
        return True
    where = _where(library) if os.sep in os.fsdecode(library) else None
    return _inside(where, installed) and not _inside(where, (scratch,))


def _audit_file_creation() -> None:
    """Make ``os.mkfifo`` and ``os.mknod`` raise an audit event, as CPython (3.10 to 3.13) does for
    the other calls that create files but not for these two."""
    for name in ("mkfifo", "mknod"):
        audited = _audited(getattr(os, name), f"os.{name}")
        setattr(os, name, audited)
        setattr(sys.modules[os.name], name, audited)  # ``from posix import mkfifo`` too


def _audited(function, event: str):
    """``function(path, ..., dir_fd=None)`` that raises ``event`` with its path and dir_fd first."""

    @functools.wraps(function)
    def call(path, *args, dir_fd=None, **kwargs):
        path = os.fspath(path)  # here, so that the guard never runs the program's code
        sys.audit(event, path, dir_fd)
        return function(path, *args, dir_fd=dir_fd, **kwargs)

    return call


def _install_guard(nonce: str, scratch: str, verdict_frame) -> None:
    """Install the guard. From here on only it knows ``nonce``; it reports the first forbidden action
    as the verdict, and otherwise the verdict raised as the ``_VERDICT`` event from ``verdict_frame``."""
    out = os.fdopen(os.dup(1), "w")
    writable = (scratch,)
    installed = tuple({os.path.realpath(p) for p in sys.path if p})
    readable = (scratch, *installed)  # imports read the installation

    def finish(verdict: str, code: int) -> None:
        out.write(f"\n{nonce} {verdict}\n")
        out.flush()
        os._exit(code)

    def refuse(reason: str) -> None:
        finish(f"failed: {reason}", 3)

    def guard(event: str, args: tuple) -> None:
        if event == _VERDICT:
            if sys._getframe(1) is not verdict_frame:
                refuse("reporting a verdict is blocked")
            finish(args[0], 0 if args[0] == "passed" else 1)
        if event == "ctypes.dlopen":
            if not _installed_library(args[0], installed, scratch):
                refuse(f"ctypes is blocked ({event} {args[0]})")
            return
        for prefix, reason in _FORBIDDEN.items():
            if event.startswith(prefix):
                refuse(f"{reason} ({event})")
        if event == "open":
            path, _, flags = args
            if isinstance(path, int) and not os.path.exists("/proc/self/fd"):
                return  # an already open descriptor, where the system cannot say what it is
            writes = bool(flags & _WRITE_FLAGS)
            if not _inside(_where(path), writable if writes else readable):
                name = path if isinstance(path, int) else os.fsdecode(path)
                refuse(f"{'writing' if writes else 'reading'} outside the scratch folder is blocked ({name})")
        elif event in _CHANGES:
            for index, dir_fd in _CHANGES[event]:
                given = dir_fd is not None and dir_fd < len(args)  # shutil.rmtree reports no dir_fd before 3.11
                where = _where(args[index], args[dir_fd] if given else None)
                if not _inside(where, writable):
                    refuse(f"changing files outside the scratch folder is blocked ({event} {args[index]})")
        elif event == "sqlite3.connect":
            database = _database_file(args[0])
            if database is not None and not _inside(_where(database), writable):
                refuse(f"writing outside the scratch folder is blocked ({event} {os.fsdecode(args[0])})")
        elif event in _READS and args and not _inside(_where(args[0]), readable):
            refuse(f"reading outside the scratch folder is blocked ({event} {args[0]})")

    sys.addaudithook(guard)


def _limit_resources(memory_mb: int, cpu_s: int, file_mb: int) -> None:
    megabyte = 1 << 20
    for limit, value in (
        (resource.RLIMIT_AS, memory_mb * megabyte),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, file_mb * megabyte),
        (resource.RLIMIT_CORE, 0),
    ):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # never above what we may set
        # CPU: the hard limit a second above the soft one, so that SIGXCPU ("timed out") comes
        # first; with both equal the kernel may send SIGKILL, which reads as "out of memory".
        cap = value + 1 if limit == resource.RLIMIT_CPU and (hard == resource.RLIM_INFINITY or value < hard) else value
        try:
            resource.setrlimit(limit, (value, cap))
        except (ValueError, OSError):
            pass  # a limit the system does not enforce (macOS has no address-space limit); the others still hold


def _failure(err: BaseException) -> str:
    # Like compressed_experts.errors.first_line, written out again on purpose: this script runs
    # in an isolated interpreter (python -I) on the standard library alone and never imports the package.
    detail = str(err).strip()
    return f"failed: {type(err).__name__}" + (f": {detail.splitlines()[0][:200]}" if detail else "")


class _Discard(io.TextIOBase):
    """Where the program's prints go: the verdict line must stay the only one that counts."""

    def write(self, text: str) -> int:
        return len(text)


def main() -> None:
    job = json.loads(sys.stdin.read())  # read to the end: the nonce cannot be read again from stdin
    _limit_resources(job["memory_mb"], job["cpu_s"], job["file_mb"])
    sys.stdout = sys.stderr = _Discard()
    _audit_file_creation()
    _install_guard(job.pop("nonce"), os.path.realpath(os.getcwd()), sys._getframe())
    program = job["program"]
    del job  # the nonce now lives in the guard only, out of reach of ``sys._getframe(1).f_locals``
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__program__"})
    except BaseException as err:  # any way the program fails (SystemExit too) is its verdict
        sys.audit(_VERDICT, _failure(err))
    else:
        sys.audit(_VERDICT, "passed")


if __name__ == "__main__":
    main()
