"""Host files a request makes jobcore touch, and the guard jobd confines other users with.

A job type lists the files its prepared spec makes the driver read or write
(``JobTypeInfo.paths``); a driver that opens files named in a domain definition passes
them to the guard it is given before it opens them. The guard decides; neither the
engine nor a driver knows for whom. jobd gives one (``owner_guard``) to clients whose uid
is neither its own nor root's: such a client may only make jobd use files it owns, in
directories it owns that no one else can write (design/daemon.md, "Access model").
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Iterable

from attrs import frozen

from jobcore.errors import AccessDenied


class Access(enum.StrEnum):
    READ = "read"
    WRITE = "write"


class PathKind(enum.StrEnum):
    """What an existing entry at the path must be."""

    FILE = "file"  # a regular file (an image, a target)
    SOCKET = "socket"  # a UNIX socket (an NBD export's)
    DIRECTORY = "directory"  # a driver connection's state directory


@frozen
class PathUse:
    """One host path a request would make jobcore open, create or remove."""

    path: str
    access: Access
    #: what the path is, for messages: "target of disk 'vda'"
    what: str
    kind: PathKind = PathKind.FILE


#: Called with every path a request would touch before any of them is opened; raises
#: (AccessDenied) to refuse the request.
PathGuard = Callable[[Iterable[PathUse]], None]

_KIND_TEST = {
    PathKind.FILE: stat.S_ISREG,
    PathKind.SOCKET: stat.S_ISSOCK,
    PathKind.DIRECTORY: stat.S_ISDIR,
}

RULE = (
    "a client whose uid is neither jobd's own nor root may only name files it owns, in a "
    "directory it owns that group and others cannot write"
)


def owner_guard(uid: int) -> PathGuard:
    """The guard for a client of uid ``uid``: see ``check_owned``."""

    def guard(uses: Iterable[PathUse]) -> None:
        for use in uses:
            check_owned(use, uid)

    return guard


def check_owned(use: PathUse, uid: int) -> None:
    """Refuse ``use`` (AccessDenied) unless uid ``uid`` owns it: the path must be
    absolute; an existing entry (symbolic links followed) must be of the use's kind and
    owned by ``uid``; and the nearest existing directory above it (symbolic links
    resolved) must be owned by ``uid`` and not writable by group or others. A dangling
    symbolic link is refused (its target is unknown)."""
    path = use.path

    def refuse(why: str) -> AccessDenied:
        return AccessDenied(f"jobd refuses {use.what} '{path}' ({use.access}) for uid {uid}: {why}")

    if not os.path.isabs(path):
        raise refuse("the path is not absolute")
    try:
        entry = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise refuse("it is a dangling symbolic link") from None
        parent = os.path.realpath(os.path.dirname(path))
    except OSError as exc:
        raise refuse(f"it cannot be examined ({exc.strerror}); {RULE}") from None
    else:
        if not _KIND_TEST[use.kind](entry.st_mode):
            raise refuse(f"it is not a {use.kind}")
        if entry.st_uid != uid:
            raise refuse(f"it is owned by uid {entry.st_uid}; {RULE}")
        parent = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            st = os.stat(parent)
            break
        except FileNotFoundError:
            if parent == os.path.dirname(parent):
                raise refuse("no directory above it exists") from None
            parent = os.path.dirname(parent)
        except OSError as exc:
            raise refuse(f"directory '{parent}' cannot be examined ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise refuse(f"'{parent}' above it is not a directory")
    if st.st_uid != uid:
        raise refuse(f"its directory '{parent}' is owned by uid {st.st_uid}; {RULE}")
    if st.st_mode & 0o022:
        raise refuse(
            f"its directory '{parent}' is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); {RULE}"
        )
