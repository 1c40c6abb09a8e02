"""--user / --group: bind as root, then run as an unprivileged user. Raises; never exits."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass

from prefork.config import quote


class PrivilegeError(Exception):
    """The user or group cannot be used; the message says why."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def resolve(user: str | None, group: str | None) -> Identity | None:
    """The identity to switch to, or None when neither is given."""
    if user is None and group is None:
        return None
    if user is None:
        uid, name = os.getuid(), pwd.getpwuid(os.getuid()).pw_name
        gid = None
    else:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(f"user: no such user {quote(user)}") from None
        uid, name, gid = entry.pw_uid, entry.pw_name, entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"group: no such group {quote(group)}") from None
    assert gid is not None
    if os.geteuid() != 0 and (uid != os.geteuid() or gid != os.getegid()):
        raise PrivilegeError(f"user/group: switching to {name} (uid {uid}, gid {gid}) needs root")
    return Identity(user=name, uid=uid, gid=gid)


def give(path: str, who: Identity) -> None:
    """Hand a file (a log file, a socket, a directory we made) to the identity we are about to become.

    Never through a symbolic link: one planted at the path (in ``/tmp``, say)
    would hand its target (``/etc/shadow``) to the user. A regular file is
    opened with ``O_NOFOLLOW`` and changed by descriptor, so what is changed is
    what was opened; a socket or a directory is changed without following a
    link (``lchown``); anything else (a device such as ``/dev/null``) is not
    ours to give and is left alone. Raises PrivilegeError.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise PrivilegeError(f"cannot hand {path} to user {who.user}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PrivilegeError(f"refusing to hand {path} to user {who.user}: it is a symbolic link "
                             "(name the file it points to)")
    try:
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PrivilegeError(f"refusing to hand {path} to user {who.user}: it changed under us")
                os.fchown(fd, who.uid, who.gid)
            finally:
                os.close(fd)
        elif stat.S_ISSOCK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            os.chown(path, who.uid, who.gid, follow_symlinks=False)
    except OSError as exc:
        raise PrivilegeError(f"cannot hand {path} to user {who.user}: {exc.strerror}") from None


def drop(who: Identity) -> None:
    """Become ``who`` for good: supplementary groups, then gid, then uid (in that order, or it fails)."""
    if os.geteuid() != 0:
        return  # already that user (resolve checked)
    try:
        os.initgroups(who.user, who.gid)
        os.setgid(who.gid)
        os.setuid(who.uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot switch to user {who.user} (uid {who.uid}, gid {who.gid}): {exc.strerror}"
        ) from exc
    if os.getuid() != who.uid or os.geteuid() != who.uid:
        raise PrivilegeError(f"still running as uid {os.geteuid()} after switching to {who.user}")
