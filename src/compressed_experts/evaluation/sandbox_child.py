"""The child side of :mod:`.sandbox`: run one program under limits and guards, report one verdict.

Started as ``python -I -B sandbox_child.py`` in a fresh scratch folder, never imported: it uses
the standard library only, and reads its job as JSON from stdin (``program``, ``nonce``,
``memory_mb``, ``cpu_s``, ``file_mb``). It prints its verdict as the line ``<nonce> <verdict>``,
so that nothing the program prints, and no early exit of the program, can pass for a verdict.

The guard is an audit hook (PEP 578), which Python offers no way to remove. On the first
forbidden action (a socket, a new process, a signal to another process, ``ctypes``, a write
anywhere but the scratch folder, a read outside it and outside the Python installation that
imports need), it reports the failure and ends the process at once, so the program cannot catch
it and carry on. This stops accidents and ordinary code, not a determined attacker: run code
from models you do not trust inside a container as well.
"""

import io
import json
import os
import resource
import sys

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
    "ctypes.": "ctypes is blocked",
    "resource.": "changing resource limits is blocked",
    "gc.get_": "inspecting the interpreter's objects is blocked",
}
#: Events that change the file system: (path argument, its dir_fd argument or None) for each path.
_CHANGES = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
}
#: Events that read the file system (a path as first argument).
_READS = ("os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.listxattr", "os.getxattr")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


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


def _install_guard(report, scratch: str) -> None:
    writable = (scratch,)
    readable = (scratch, *{os.path.realpath(p) for p in sys.path if p})  # imports read the installation

    def refuse(reason: str) -> None:
        report(f"failed: {reason}")
        os._exit(3)

    def guard(event: str, args: tuple) -> None:
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
                where = _where(args[index], args[dir_fd] if dir_fd is not None else None)
                if not _inside(where, writable):
                    refuse(f"changing files outside the scratch folder is blocked ({event} {args[index]})")
        elif event in _READS and args and not _inside(_where(args[0]), readable):
            refuse(f"reading outside the scratch folder is blocked ({event} {args[0]})")

    sys.addaudithook(guard)


class _Discard(io.TextIOBase):
    """Where the program's prints go: the verdict line must stay the only one that counts."""

    def write(self, text: str) -> int:
        return len(text)


def main() -> None:
    job = json.loads(sys.stdin.read())
    out = os.fdopen(os.dup(1), "w")

    def report(verdict: str) -> None:
        out.write(f"\n{job['nonce']} {verdict}\n")
        out.flush()

    megabyte = 1 << 20
    for limit, value in ((resource.RLIMIT_AS, job["memory_mb"] * megabyte), (resource.RLIMIT_CPU, job["cpu_s"]),
                         (resource.RLIMIT_FSIZE, job["file_mb"] * megabyte), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # never above what we may set
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass  # a limit the system does not enforce (macOS has no address-space limit); the others still hold
    sys.stdout = sys.stderr = _Discard()
    _install_guard(report, os.path.realpath(os.getcwd()))
    try:
        exec(compile(job["program"], "<program>", "exec"), {"__name__": "__program__"})
    except BaseException as err:  # any way the program fails (SystemExit too) is its verdict
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        report(f"failed: {type(err).__name__}" + (f": {detail}" if detail else ""))
        os._exit(1)
    report("passed")
    os._exit(0)


if __name__ == "__main__":
    main()
