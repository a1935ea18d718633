"""The exception tree of jobcore.

    JobError                    base of everything jobcore raises on purpose
     ├── XMLError               a job, backup or checkpoint document is malformed or refused
     ├── InvalidURI             a connection URI names no driver or is malformed
     ├── NoSuchDomain           no domain of that name on the connection
     ├── NoSuchJob              no active or retained job with that UUID (or alias)
     ├── NoSuchCheckpoint       no checkpoint of that name on the domain
     ├── JobConflict            admission refused: another job holds a resource
     ├── OperationInvalid       a verb the job's state (or type) does not accept
     ├── QueueTimeout           a queued job was not admitted in time
     ├── SubscriptionOverflow   an event subscriber fell too far behind and was ended
     ├── Unsupported            the driver does not implement that operation
     ├── DriverError            the hypervisor failed; the message carries its text
     └── DaemonUnreachable      no jobd answers at the socket, or the connection was lost
          └── ConnectionLost    jobd went away while a call was in flight

Cancellation (anyio/trio) is never wrapped into these: it stays a BaseException.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing and uuid are not loaded for this (jobctl's fast start)
if TYPE_CHECKING:
    import uuid


class JobError(Exception):
    """Base of every error jobcore raises on purpose."""


class XMLError(JobError):
    """A document is malformed, invalid against its schema, or refused (hostile, too large).

    ``line`` is the 1-based line of the offending node when known.
    """

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"{message} (line {line})" if line is not None else message)


class InvalidURI(JobError):
    """A connection URI is malformed or names a scheme no driver registered."""


class NoSuchDomain(JobError):
    """No domain of that name exists on the connection."""


class NoSuchJob(JobError):
    """No active or retained job matches."""


class NoSuchCheckpoint(JobError):
    """No checkpoint of that name exists on the domain (or a checkpoint has no parent)."""


class JobConflict(JobError):
    """A job cannot be admitted because another job holds a contested resource."""

    def __init__(self, message: str, *, holder: uuid.UUID, resource: str) -> None:
        self.holder = holder
        self.resource = resource
        super().__init__(message)


class OperationInvalid(JobError):
    """A verb was refused: the job's state or type does not accept it."""

    def __init__(
        self,
        message: str,
        *,
        job: uuid.UUID | None = None,
        state: str | None = None,
        verb: str | None = None,
    ) -> None:
        self.job = job
        self.state = state
        self.verb = verb
        super().__init__(message)


class QueueTimeout(JobError):
    """A job that asked to queue was not admitted before its timeout."""


class SubscriptionOverflow(JobError):
    """An event subscription was ended because its consumer lost more events than its
    limit allows without catching up; ``lost`` is every event it lost."""

    def __init__(self, message: str, *, lost: int) -> None:
        self.lost = lost
        super().__init__(message)


class AccessDenied(JobError):
    """The call is not allowed to this caller: a read-only connection, a uid jobd does not
    allow, or a file a confined uid may not make jobd touch."""


class Unsupported(JobError):
    """The driver does not implement the requested operation or job type."""


class DriverError(JobError):
    """The hypervisor reported a failure; the message carries its text."""


class DaemonUnreachable(JobError):
    """No daemon answers at the socket, or the connection to it was lost."""


class ConnectionLost(DaemonUnreachable):
    """The daemon went away (or its connection broke) while the call was in flight: the
    call fails at once, whatever it waited for. The call may or may not have taken effect
    on the daemon; the remote client reconnects by itself (design/daemon.md, "Reconnecting")
    and the handles stay usable."""


class InvalidArgument(JobError):
    """An argument is wrong for the domain: unknown disk, chain index out of range, a
    duplicate job UUID, …"""


class StoreError(JobError):
    """The job store cannot be opened (corrupt, locked by another process, a newer
    schema) or written (no space left: new jobs are refused)."""


def leaf_error(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups from task groups: at each level
    the first ``Exception`` member (a cancellation beside it is not what went wrong), else
    the first member. Anything that is not a group is returned as is."""
    while isinstance(exc, BaseExceptionGroup):
        members = exc.exceptions
        exc = next((e for e in members if isinstance(e, Exception)), members[0])
    return exc
