"""The operating system's sandbox for generated code: bubblewrap, with a seccomp filter.

Each process of a run (:mod:`.sandbox`) starts inside ``bwrap`` with new namespaces of every
kind: a network namespace with no interface but its own loopback (no network), a PID namespace
(it sees, signals and traces only its own processes, and they all die with it), a mount
namespace in which the file system is read-only and holds only what Python needs (``/usr``, the
system's libraries, the Python installation) and a scratch folder ``/tmp`` that is a size-limited
``tmpfs`` of its own (so nothing it writes reaches the disk, and all of it is gone with the
process). It has no capabilities, cannot gain privileges (bubblewrap sets ``no_new_privs``), runs
in a session of its own (no terminal to inject keystrokes into) and is killed with its parent
(``--die-with-parent``). On x86-64 and AArch64 a seccomp filter also refuses the system calls
that start processes (``fork``, ``clone`` but for threads), trace or read other processes, mount
file systems, make namespaces, load kernel modules or BPF programs, and use ``io_uring``.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

#: Where each process works and may write: a tmpfs of its own inside the sandbox.
SCRATCH = "/tmp"

# Classic BPF, as seccomp reads it (linux/filter.h, linux/seccomp.h).
_LOAD, _JUMP_EQUAL, _JUMP_AT_LEAST, _JUMP_SET, _RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
_KILL, _ERRNO, _ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_EPERM, _ENOSYS, _CLONE_THREAD = 1, 38, 0x00010000
#: Per architecture: its AUDIT_ARCH value, clone, clone3, and the system calls refused outright.
_DENIED_NAMES = (
    "fork vfork ptrace process_vm_readv process_vm_writev mount umount2 pivot_root chroot unshare setns bpf "
    "perf_event_open keyctl add_key request_key kexec_load kexec_file_load init_module finit_module "
    "delete_module userfaultfd io_uring_setup io_uring_enter io_uring_register open_by_handle_at "
    "name_to_handle_at fsopen fsconfig fsmount fspick move_mount open_tree mount_setattr pidfd_getfd "
    "process_madvise quotactl swapon swapoff reboot acct syslog"
).split()
_SYSCALLS = {
    "x86_64": (
        0xC000003E,
        dict(
            zip(
                ["clone", "clone3", *_DENIED_NAMES],
                [56, 435, 57, 58, 101, 310, 311, 165, 166, 155, 161, 272, 308, 321, 298, 250, 248, 249, 246, 320]
                + [175, 313, 176, 323, 425, 426, 427, 304, 303, 430, 431, 432, 433, 429, 428, 442, 438, 440]
                + [179, 167, 168, 169, 163, 103],
                strict=True,
            )
        ),
    ),
    "aarch64": (  # the generic table: no fork or vfork
        0xC00000B7,
        dict(
            zip(
                ["clone", "clone3", *_DENIED_NAMES[2:]],
                [220, 435, 117, 270, 271, 40, 39, 41, 51, 97, 268, 280, 241, 219, 217, 218, 104, 294, 105]
                + [273, 106, 282, 425, 426, 427, 265, 264, 430, 431, 432, 433, 429, 428, 442, 438, 440]
                + [60, 224, 225, 142, 89, 116],
                strict=True,
            )
        ),
    ),
}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def _instruction(code: int, k: int, true: int = 0, false: int = 0) -> bytes:
    return struct.pack("=HBBI", code, true, false, k)


@functools.cache
def seccomp_filter() -> bytes | None:
    """The seccomp program for this machine's architecture, or None where it has none here."""
    machine = _MACHINES.get(platform.machine().lower())
    if machine is None:
        return None
    arch, numbers = _SYSCALLS[machine]
    refuse = _instruction(_RETURN, _ERRNO | _EPERM)
    program = [
        _instruction(_LOAD, 4),  # seccomp_data.arch
        _instruction(_JUMP_EQUAL, arch, 1, 0),
        _instruction(_RETURN, _KILL),  # another ABI (32-bit calls on x86-64)
        _instruction(_LOAD, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":  # the x32 ABI: the same calls under numbers from 0x40000000 on
        program += [_instruction(_JUMP_AT_LEAST, 0x40000000, 0, 1), refuse]
    for name, number in numbers.items():
        if name not in ("clone", "clone3"):
            program += [_instruction(_JUMP_EQUAL, number, 0, 1), refuse]
    program += [
        # clone3 passes its flags in memory a filter cannot read: "not implemented", and the C
        # library falls back to clone for its threads
        _instruction(_JUMP_EQUAL, numbers["clone3"], 0, 1),
        _instruction(_RETURN, _ERRNO | _ENOSYS),
        _instruction(_JUMP_EQUAL, numbers["clone"], 0, 3),
        _instruction(_LOAD, 16),  # the low half of clone's first argument, its flags
        _instruction(_JUMP_SET, _CLONE_THREAD, 1, 0),
        refuse,  # a new process
        _instruction(_RETURN, _ALLOW),
    ]
    return b"".join(program)


def _python_folders() -> list[str]:
    """The folders of the Python installation (a virtual environment and the one it is made from)."""
    folders = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    folders |= {os.path.realpath(f) for f in folders}
    folders.add(os.path.dirname(os.path.realpath(sys.executable)))
    if os.path.isdir("/nix/store"):  # a Nix Python finds its libraries across the store
        folders.add("/nix/store")
    return sorted(f for f in folders if os.path.isdir(f))


@functools.cache
def _view() -> tuple[str, ...]:
    """bwrap's arguments for the read-only file system a program sees: what Python needs, no more."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime"):
        args += ["--ro-bind-try", path, path]
    covered: list[str] = ["/usr"]
    for folder in _python_folders():  # shortest first: a folder inside one already there is there
        if not any(folder == c or folder.startswith(c.rstrip("/") + "/") for c in covered):
            args += ["--ro-bind", folder, folder]
            covered.append(folder)
    return tuple(args)


def bubblewrap_command(
    bwrap: str, scratch_bytes: int, seccomp_fd: int | None, command: list[str], visible: tuple[str, ...] = ()
) -> list[str]:
    """``command`` inside a new sandbox (see the module's description), the files ``visible`` read-only."""
    files = [arg for path in visible for arg in ("--ro-bind", str(Path(path).resolve()), str(Path(path).resolve()))]
    return [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        # The scratch tmpfs first: a Python installed under it (a virtual environment in /tmp) is
        # bound over it next, instead of being hidden by it.
        "--size",
        str(scratch_bytes),
        "--tmpfs",
        SCRATCH,
        *_view(),
        *files,
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--chdir",
        SCRATCH,
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--",
        *command,
    ]


def seccomp_pipe(program: bytes | None) -> int | None:
    """A descriptor bwrap reads ``program`` from (to pass to it, then close), or None for none."""
    if program is None:
        return None
    read, write = os.pipe()
    try:
        os.write(write, program)  # far below a pipe's capacity
    finally:
        os.close(write)
    return read


@functools.cache
def probe() -> tuple[str, str]:
    """Which OS sandbox works here: ("bubblewrap+seccomp" or "bubblewrap", ""), or ("", why none)."""
    if not sys.platform.startswith("linux"):
        return "", f"bubblewrap needs Linux (this is {sys.platform})"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "", "bubblewrap is not installed (apt-get install bubblewrap, dnf install bubblewrap)"
    check = [sys.executable, "-I", "-S", "-B", "-c", "import hashlib, json, math, sqlite3; print('ok')"]
    reason = ""
    for program in (seccomp_filter(), None) if seccomp_filter() is not None else (None,):
        fd = seccomp_pipe(program)
        try:
            done = subprocess.run(
                bubblewrap_command(bwrap, 1 << 20, fd, check),
                capture_output=True,
                timeout=60,
                pass_fds=() if fd is None else (fd,),
                env={"PATH": os.defpath, "LANG": "C.UTF-8"},
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return "", f"bubblewrap does not run here ({err})"
        finally:
            if fd is not None:
                os.close(fd)
        if done.returncode == 0 and done.stdout.strip() == b"ok":
            return ("bubblewrap+seccomp" if program else "bubblewrap"), ""
        reason = reason or (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    return "", f"bubblewrap does not run here ({reason})"
