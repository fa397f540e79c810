"""The two processes of one sandboxed run (:mod:`.sandbox`): the program's, and the tests'.

Started as ``python -I -S -B sandbox_child.py <role> ...`` and never imported: it uses the standard
library only. The two roles talk over a pair of pipes, in messages of JSON:

``program``
    Runs the generated code, then answers calls: the tests' process names a function of the
    code and gives its arguments; this process calls it and sends back the return value, or the
    exception it raised. Nothing this process does is trusted: it may patch anything in its own
    interpreter, and whatever it sends is only data.
``tests``
    Runs the problem's tests (trusted: they come from the data set) in an interpreter of its own,
    which the program's code never touches: each name the tests take from the code is a stand-in
    that calls over to the program's process. Values cross between the two as plain data,
    serialised by type (None, bool, int, float, complex, str, bytes, and lists, tuples, sets,
    frozensets and dicts of them), and come back as objects of exactly those built-in types:
    a returned object whose ``__eq__`` is always true, or a patched ``builtins.abs``, never
    reaches the tests. This process alone reports the verdict, on its standard output, which
    the program's process has no handle on.

Arguments after the role: memory (MB), CPU seconds, file size (MB), the evaluating process's pid
(0 inside the OS sandbox, which kills its processes with their parent itself; else each process
asks the kernel for that), ``guard`` or ``-``, and for the tests' process its two ends of the pipes.

Where the operating system gives no sandbox (see :mod:`.sandbox`), the program's process also
installs the audit-hook guard below (``guard``): it refuses network access, new processes,
files outside the scratch folder and the like, but Python code can get around it.
"""

import builtins
import functools
import importlib
import json
import numbers
import os
import resource
import symtable
import sys
import types
import urllib.parse

#: The longest message either side accepts (a value of a few million list items).
_MAX_MESSAGE = 64 << 20
#: How deeply values may nest, and how many items of an iterator a return value may carry.
_MAX_DEPTH, _MAX_ITEMS = 100, 1_000_000


# --- messages and values -------------------------------------------------------------------------


def _send(fd: int, message) -> None:
    data = json.dumps(message).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int):
    """The next message, or None when the other side has gone; ValueError for a malformed one."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > _MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes")
    data = _read_exactly(fd, size)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (RecursionError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"a malformed message ({type(err).__name__})") from None


class Unsupported(TypeError):
    """A value that cannot cross between the processes."""


def encode(value, depth: int = 0):
    """``value`` as JSON data tagged by type. Subclasses of the built-in types go as their base type
    (their own methods do not travel), numbers of other types (numpy's) as int, float or complex,
    and an iterator as the list of its items."""
    if depth > _MAX_DEPTH:
        raise Unsupported("a value nested more deeply than 100 levels")
    deeper = functools.partial(encode, depth=depth + 1)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, numbers.Integral)) and not _is_bool_like(value):
        return int(value)
    if isinstance(value, (float, numbers.Real)):
        return float(value)
    if isinstance(value, (complex, numbers.Complex)):
        value = complex(value)
        return {"t": "complex", "v": [value.real, value.imag]}
    if _is_bool_like(value):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"t": type(value).__mro__[-2].__name__, "v": bytes(value).decode("latin-1")}
    if isinstance(value, list):
        return [deeper(item) for item in list.__iter__(value)]
    for kind in (tuple, set, frozenset):
        if isinstance(value, kind):
            return {"t": kind.__name__, "v": [deeper(item) for item in kind.__iter__(value)]}
    if isinstance(value, dict):
        return {"t": "dict", "v": [[deeper(k), deeper(v)] for k, v in dict.items(value)]}
    if isinstance(value, (types.GeneratorType, map, filter, zip, enumerate, reversed)) or _is_iterator(value):
        items = []
        for item in value:
            if len(items) == _MAX_ITEMS:
                raise Unsupported(f"an iterator of more than {_MAX_ITEMS} items")
            items.append(deeper(item))
        return {"t": "iter", "v": items}
    raise Unsupported(f"an object of type {type(value).__qualname__}")


def _is_bool_like(value) -> bool:
    return type(value).__name__ in ("bool_", "bool") and type(value).__module__ == "numpy"


def _is_iterator(value) -> bool:
    kind = type(value)
    return hasattr(kind, "__next__") and hasattr(kind, "__iter__")


def decode(data, depth: int = 0):
    """The value that ``data`` (from :func:`encode`, or made up by the program) stands for, built
    of built-in types only; ValueError where it is not what :func:`encode` writes."""
    if depth > _MAX_DEPTH + 1:
        raise ValueError("a value nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    deeper = functools.partial(decode, depth=depth + 1)
    if kind is list:
        return [deeper(item) for item in data]
    if kind is not dict or set(data) != {"t", "v"}:
        raise ValueError("a malformed value")
    tag, items = data["t"], data["v"]
    try:
        if tag in ("bytes", "bytearray") and type(items) is str:
            return (bytes if tag == "bytes" else bytearray)(items.encode("latin-1"))
        if type(items) is not list:
            raise ValueError("a malformed value")
        if tag == "complex" and len(items) == 2 and all(type(x) in (int, float) for x in items):
            return complex(*items)
        if tag in ("tuple", "set", "frozenset", "iter"):
            made = {"tuple": tuple, "set": set, "frozenset": frozenset, "iter": list}[tag](map(deeper, items))
            return iter(made) if tag == "iter" else made
        if tag == "dict" and all(type(pair) is list and len(pair) == 2 for pair in items):
            return {deeper(k): deeper(v) for k, v in items}
    except (TypeError, UnicodeEncodeError) as err:  # e.g. a list as a dict key
        raise ValueError(f"a malformed value ({err})") from None
    raise ValueError("a malformed value")


def _describe(err: BaseException) -> list[str]:
    """An exception as [its type's name, the first line of its message]."""
    try:
        detail = str(err).strip()
    except Exception:
        detail = ""
    return [type(err).__name__, detail.splitlines()[0][:200] if detail else ""]


def _failure(kind: str, detail: str) -> str:
    """The verdict on an exception named ``kind`` (by the program: only its first line counts)."""
    kind = kind[:100] if kind.isidentifier() else "Exception"
    detail = detail.strip().splitlines()[0][:200] if detail.strip() else ""
    return f"failed: {kind}" + (f": {detail}" if detail else "")


# --- both processes ------------------------------------------------------------------------------


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


def _die_with_parent(parent: int) -> None:
    """Without the OS sandbox (which does this itself): be killed when the evaluating process dies,
    where the system can (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig, sigkill = 1, 9
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)


def _start(argv: list[str]) -> tuple[int, int]:
    """Limits and the start common to both roles; the standard streams handed back as the channel."""
    memory_mb, cpu_s, file_mb, parent = (int(a) for a in argv[:4])
    if parent:
        _die_with_parent(parent)
    _limit_resources(memory_mb, cpu_s, file_mb)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # an int of any size goes as JSON digits
    sys.path += [p for p in os.environ.get("CE_SANDBOX_PACKAGES", "").split(os.pathsep) if p]  # run with -S
    channel = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # what the code prints, down to the C level, goes nowhere
        os.dup2(null, fd)
    return channel


# --- the program's process -----------------------------------------------------------------------


def _names(namespace: dict, wanted: list[str]) -> dict:
    """What the tests get for each name they take from the code."""
    found = {}
    for name in wanted:
        if type(name) is not str or name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            found[name] = {"module": str(getattr(value, "__name__", ""))}
        elif callable(value):
            found[name] = {"call": True}
        else:
            try:
                found[name] = {"value": encode(value)}
            except Unsupported as err:
                found[name] = {"unsupported": str(err)}
    return found


def _answer(namespace: dict, message) -> dict:
    """Call what ``message`` names with its arguments; the return value or the exception raised."""
    try:
        function = namespace[message["call"]]
        args, kwargs = decode(message["args"]), decode(message["kwargs"])
        result = function(*args, **kwargs)
    except BaseException as err:
        return _raised(err)
    try:
        return {"value": encode(result)}
    except Unsupported as err:
        return {"unsupported": str(err)}
    except BaseException as err:
        return _raised(err)


def _raised(err: BaseException) -> dict:
    """The answer for an exception: its type's name, its message, and its arguments where they travel."""
    try:
        arguments = encode(list(err.args))
    except Exception:
        arguments = None
    return {"raised": _describe(err), "args": arguments}


def program(argv: list[str]) -> None:
    """Run the code the tests' process sends, then answer its calls until it hangs up."""
    receive_fd, send_fd = _start(argv)
    job = _receive(receive_fd)
    if job is None:
        os._exit(0)
    if argv[4] == "guard":
        _audit_file_creation()
        _install_guard(os.path.realpath(os.getcwd()), send_fd)
    namespace = {"__name__": "__program__"}
    try:
        exec(compile(job["code"], "<program>", "exec"), namespace)
    except BaseException as err:
        _send(send_fd, {"error": _describe(err)})
        os._exit(1)
    _send(send_fd, {"names": _names(namespace, job["names"])})
    while True:
        message = _receive(receive_fd)
        if message is None:
            os._exit(0)
        _send(send_fd, _answer(namespace, message))


# --- the tests' process --------------------------------------------------------------------------


class _Broken(BaseException):
    """The program's process broke the run (died, sent nonsense, did something forbidden, returned
    what the tests cannot check): a failure that no ``except`` in the tests can turn into a pass."""


def _bound_and_used(source: str, name: str) -> tuple[set[str], set[str]]:
    """The names ``source`` binds at top level, and those it uses as globals anywhere."""
    bound, used, tables = set(), set(), [symtable.symtable(source, name, "exec")]
    for symbol in tables[0].get_symbols():
        if symbol.is_assigned() or symbol.is_imported():
            bound.add(symbol.get_name())
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            if symbol.is_referenced() and (symbol.is_global() or table.get_type() == "module"):
                used.add(symbol.get_name())
    return bound, used


class _Tests:
    """The tests' side of one run."""

    def __init__(self, send_fd: int, receive_fd: int) -> None:
        self.send_fd, self.receive_fd = send_fd, receive_fd
        self.broken: str | None = None

    def ask(self, message) -> dict:
        """Send ``message`` to the program's process and return its answer (a dict)."""
        if self.broken is not None:
            raise _Broken(self.broken)
        try:
            _send(self.send_fd, message)
            answer = _receive(self.receive_fd)
        except BrokenPipeError:
            answer = None
        except ValueError as err:
            return self.break_off(f"failed: the program sent {err}")
        if answer is None:
            return self.break_off("died")
        if type(answer) is not dict or not 1 <= len(answer) <= 2:
            return self.break_off("failed: the program sent a malformed message")
        if "blocked" in answer:
            return self.break_off(f"failed: {answer['blocked']}" if type(answer["blocked"]) is str else "failed")
        return answer

    def break_off(self, reason: str):
        self.broken = reason
        raise _Broken(reason)

    def stand_in(self, name: str):
        """A function that calls ``name`` in the program's process."""

        def call(*args, **kwargs):
            try:
                message = {"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
            except Unsupported as err:  # e.g. a function as an argument
                raise TypeError(f"the tests pass {err} to {name}, which cannot cross into the sandbox") from None
            answer = self.ask(message)
            if "value" in answer:
                try:
                    return decode(answer["value"])
                except ValueError as err:
                    self.break_off(f"failed: {name} returned {err}")
            if "unsupported" in answer:
                detail = answer["unsupported"] if type(answer["unsupported"]) is str else "a value"
                self.break_off(
                    f"failed: {name} returned {detail[:100]}, which the tests cannot check (the sandbox passes "
                    f"None, bool, numbers, str, bytes and lists, tuples, sets and dicts of them)"
                )
            if "raised" in answer and _is_pair(answer["raised"]):
                try:
                    arguments = decode(answer.get("args"))
                except ValueError:
                    arguments = None
                raise _rebuilt(*answer["raised"], arguments if type(arguments) is list else None)
            self.break_off("failed: the program sent a malformed message")

        call.__name__ = call.__qualname__ = name
        return call

    def run(self, job: dict) -> str:
        """The verdict on ``job``'s code under its tests."""
        tests, setup = job["tests"], job["setup"]
        try:
            setup_bound, _ = _bound_and_used(setup, "<setup>")
            tests_bound, used = _bound_and_used(tests, "<tests>")
        except SyntaxError as err:
            return f"failed: the tests do not compile ({err})"
        if job["calls"] is not None:
            wanted = list(job["calls"])
        else:  # what the tests use and neither they, their set-up nor Python itself defines
            wanted = sorted(used - tests_bound - setup_bound - set(dir(builtins)))
        try:
            answer = self.ask({"code": job["code"], "names": wanted})
        except _Broken:
            return self.broken
        if "error" in answer:
            return _failure(*answer["error"]) if _is_pair(answer["error"]) else "failed"
        if type(answer.get("names")) is not dict:
            return "failed: the program sent a malformed message"
        namespace = {"__name__": "__tests__"}
        try:
            exec(compile(setup, "<setup>", "exec"), namespace)
        except BaseException as err:
            return "failed: the tests' set-up code raised " + _failure(*_describe(err)).removeprefix("failed: ")
        for name, found in answer["names"].items():
            if name not in wanted or type(found) is not dict:
                continue
            if "call" in found:
                namespace[name] = self.stand_in(name)
            elif "module" in found:
                module = _module(found["module"])
                if module is not None:
                    namespace[name] = module
            elif "value" in found:
                try:
                    namespace[name] = decode(found["value"])
                except ValueError:
                    return "failed: the program sent a malformed message"
        try:
            exec(compile(tests, "<tests>", "exec"), namespace)
        except _Broken:
            pass
        except BaseException as err:
            return self.broken or _failure(*_describe(err))
        return self.broken or "passed"


def _is_pair(value) -> bool:
    return type(value) is list and len(value) == 2 and all(type(x) is str for x in value)


class ProgramError(Exception):
    """What the tests see of an exception of the program's that is not one of Python's own."""


def _rebuilt(kind: str, detail: str, arguments: list | None) -> Exception:
    """The exception the program raised, as one of Python's own types where it names one, so that
    tests which expect, say, a ValueError still see one; else a :class:`ProgramError`."""
    known = getattr(builtins, kind, None)
    if isinstance(known, type) and issubclass(known, Exception):
        try:
            return known(*arguments) if arguments is not None else known(detail) if detail else known()
        except Exception:
            pass
    error = ProgramError(detail)
    error.kind = kind
    return error


def _module(name) -> types.ModuleType | None:
    """The module the code bound a name to, imported here afresh: the standard library's and
    numpy's only, so that the program's process cannot make this one import just anything."""
    if type(name) is not str or not all(part.isidentifier() for part in name.split(".")):
        return None
    top = name.split(".")[0]
    if top not in getattr(sys, "stdlib_module_names", ()) and top != "numpy" or top.startswith("_"):
        return None
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def tests(argv: list[str]) -> None:
    """Read the job from standard input, run its tests against the program's process, and write
    the verdict to standard output as one JSON line."""
    job = json.loads(sys.stdin.read())
    send_fd, receive_fd = int(argv[5]), int(argv[6])
    stdin, report = _start(argv)
    os.close(stdin)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # what the tests print
    verdict = _Tests(send_fd, receive_fd).run(job)
    with os.fdopen(report, "w") as out:
        out.write("\n" + json.dumps({"died": True} if verdict == "died" else {"verdict": verdict}) + "\n")
    os._exit(0)


# --- the guard, where there is no OS sandbox -------------------------------------------------------

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
    "sys.settrace": "tracing the interpreter is blocked",
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
    """The file a SQLite database name opens, or None for one in memory or a temporary one."""
    name = os.fsdecode(name)
    if name.startswith("file:"):
        uri = urllib.parse.urlsplit(name)
        if "memory" in urllib.parse.parse_qs(uri.query).get("mode", []):
            return None
        name = urllib.parse.unquote(uri.path)
    return None if name in ("", ":memory:") else name


def _installed_library(library, installed: tuple[str, ...], scratch: str) -> bool:
    """Whether ``ctypes.dlopen(library)`` opens the interpreter itself or a library of the Python
    installation, as packages do; not one the system finds by name, nor one the program wrote."""
    if library is None:
        return True
    where = _where(library) if os.sep in os.fsdecode(library) else None
    return _inside(where, installed) and not _inside(where, (scratch,))


def _audit_file_creation() -> None:
    """Make ``os.mkfifo`` and ``os.mknod`` raise an audit event, as CPython does not."""
    for name in ("mkfifo", "mknod"):
        audited = _audited(getattr(os, name), f"os.{name}")
        setattr(os, name, audited)
        setattr(sys.modules[os.name], name, audited)  # ``from posix import mkfifo`` too


def _audited(function, event: str):
    @functools.wraps(function)
    def call(path, *args, dir_fd=None, **kwargs):
        path = os.fspath(path)
        sys.audit(event, path, dir_fd)
        return function(path, *args, dir_fd=dir_fd, **kwargs)

    return call


def _install_guard(scratch: str, send_fd: int) -> None:
    """An audit hook that ends the process on the first forbidden action, telling the tests' process
    why. Python code can get around it (see :mod:`.sandbox`): it stops accidents, not attacks."""
    writable = (scratch,)
    installed = tuple({os.path.realpath(p) for p in sys.path if p})
    readable = (scratch, *installed)  # imports read the installation

    def refuse(reason: str) -> None:
        _send(send_fd, {"blocked": reason})
        os._exit(3)

    def guard(event: str, args: tuple) -> None:
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
                given = dir_fd is not None and dir_fd < len(args)
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


if __name__ == "__main__":
    {"program": program, "tests": tests}[sys.argv[1]](sys.argv[2:])
