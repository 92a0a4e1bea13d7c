"""chmod of a unix socket a server just bound: shared by the socketmap, the control
socket and preflight's checks (below every layer, so no front end imports the service)."""

from __future__ import annotations

import errno
import os
import stat


def chmod_socket(path: str, mode: int) -> None:
    """chmod the unix socket a server just bound at path, never through a symlink: the
    inode is opened with O_PATH|O_NOFOLLOW and changed through /proc/self/fd (Linux has
    no lchmod; this is what glibc's fchmodat(AT_SYMLINK_NOFOLLOW) does)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, f"{path} is not a socket")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)
