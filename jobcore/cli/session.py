"""Which connection a command uses and how it runs on it: the URI, the connection's
lifetime, errors turned into exit statuses, JOB arguments resolved to jobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click
from attrs import frozen

import jobcore
from jobcore.cli.errors import ExitCode, Refusal, broken_pipe, classify, exit_with, fail
from jobcore.errors import JobError, NoSuchJob, leaf_error
from jobcore.protocol import resolve_default_daemon
from jobcore.uri import parse_uri

if TYPE_CHECKING:
    from jobcore.api import Connection, Job

EMBEDDED_URI = "sim:///default"


@frozen
class Ctx:
    """The command line's connection: its URI, and whether it is in-process (embedded)."""

    uri: str
    embedded: bool


def current() -> Ctx:
    """The running command's ``Ctx`` (the root group puts it in place)."""
    obj = click.get_current_context().find_object(Ctx)
    assert obj is not None
    return obj


def default_uri() -> str:
    """The local daemon's URI if one answers in the default run directory, else the
    embedded simulator."""
    return resolve_uri(EMBEDDED_URI)


def resolve_uri(uri: str) -> str:
    """The URI a command connects to: a plain ``qemu:///…``/``sim:///…`` reaches the
    default run directory's jobd when one answers (jobcore.protocol.resolve_default_daemon,
    the rule jobcore.libvirt follows), anything else is used as it is."""
    return resolve_default_daemon(uri)[0]


def run(
    body: Callable[[Connection], Coroutine[Any, Any, int | None]], *, events: bool = False
) -> NoReturn:
    """Open the command's connection, run ``body``, exit with its status (or the error's).

    On a jobd URI ``body`` runs on the loop-free blocking client (jobcore.remote
    ``connect_blocking``): each of its calls completes without suspending, so no event
    loop (nor anyio) is started. A body that needs events (``events``: subscriptions,
    progress) and the embedded connection run on an event loop as before."""
    uri = current().uri
    try:
        if events or parse_uri(uri).transport != "unix":
            code = _on_event_loop(uri, body)
        else:
            code = _on_blocking_client(uri, body)
    except KeyboardInterrupt:
        exit_with(ExitCode.INTERRUPTED)
    except BaseException as exc:
        error = leaf_error(exc)
        if isinstance(error, SystemExit | KeyboardInterrupt):
            raise error from None
        if isinstance(error, BrokenPipeError):  # socket errors arrive as ConnectionLost
            broken_pipe()
        status, message = classify(error)
        if status is ExitCode.UNREACHABLE and "cannot reach" in message:
            message += " (is jobd running? start it with 'jobctl daemon')"
        fail(status, message)
    exit_with(code or 0)


def _on_event_loop(
    uri: str, body: Callable[[Connection], Coroutine[Any, Any, int | None]]
) -> int | None:
    import anyio

    async def main() -> int | None:
        async with jobcore.connect(uri) as conn:
            return await body(conn)

    return anyio.run(main)


def _on_blocking_client(
    uri: str, body: Callable[[Connection], Coroutine[Any, Any, int | None]]
) -> int | None:
    from jobcore.remote import connect_blocking

    conn = connect_blocking(uri)
    try:
        coro = body(conn)
        try:
            coro.send(None)
        except StopIteration as done:
            return cast("int | None", done.value)
        coro.close()
        raise JobError("internal error: a jobctl command waited for an event loop it has not")
    finally:
        conn.close_blocking()


#: Matching UUIDs an ambiguous prefix's error lists.
_PREFIX_SHOWN = 3


async def resolve_job(conn: Connection, text: str) -> Job:
    """A job from its UUID, or from a unique prefix of one (any domain's)."""
    try:
        return await conn.lookup_job(uuid.UUID(text))
    except ValueError:
        pass
    prefix = text.lower().replace("-", "")
    if len(prefix) < 4 or any(ch not in "0123456789abcdef" for ch in prefix):
        raise Refusal(ExitCode.USAGE, f"'{text}' is not a job UUID (or a prefix of 4+ hex digits)")
    found = await conn.find_jobs(prefix, limit=_PREFIX_SHOWN + 1)  # the store's UUID index
    if not found:
        raise NoSuchJob(f"no job with a UUID starting with '{text}'")
    if len(found) > 1:
        shown = ", ".join(str(j.uuid) for j in found[:_PREFIX_SHOWN])
        more = " and more" if len(found) > _PREFIX_SHOWN else ""
        raise Refusal(
            ExitCode.USAGE, f"'{text}' matches several jobs ({shown}{more}): use more digits"
        )
    return found[0]
