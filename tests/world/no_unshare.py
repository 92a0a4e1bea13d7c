"""Run a command under a seccomp filter that refuses unshare(2) with EPERM, as Docker's
default profile does for a container without CAP_SYS_ADMIN; everything else is allowed.
The filter survives exec and is inherited by every thread.

    python no_unshare.py COMMAND [ARG...]

available() says whether libseccomp (Debian: libseccomp2) can be loaded here.
"""

import ctypes
import errno
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000


def scmp_act_errno(code):
    return 0x00050000 | (code & 0xFFFF)


def _libseccomp():
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def available():
    try:
        _libseccomp()
    except OSError:
        return False
    return True


def refuse_unshare():
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    number = lib.seccomp_syscall_resolve_name(b"unshare")
    if not ctx or number < 0 or lib.seccomp_rule_add(ctx, scmp_act_errno(errno.EPERM), number, 0):
        raise OSError("cannot build the seccomp filter")
    if lib.seccomp_load(ctx):  # sets no_new_privs first (libseccomp's default)
        raise OSError("cannot load the seccomp filter")


if __name__ == "__main__":
    refuse_unshare()
    os.execvp(sys.argv[1], sys.argv[1:])
