"""The request handlers, one per ``jobcore.protocol.Method`` (registered in ``_HANDLERS``)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from jobcore.api import Connection, Domain, Job, uuid_prefix
from jobcore.daemon.config import HANDLE_CACHE, MAX_LIST_PAGE
from jobcore.daemon.sessions import _Client
from jobcore.errors import JobError
from jobcore.protocol import (
    MAX_FRAME,
    Method,
    Wire,
    encode_domain_info,
    encode_domain_ref,
    encode_job_info,
    encode_job_ref,
)

if TYPE_CHECKING:
    from jobcore.daemon.server import Daemon


Handler = Callable[["Daemon", _Client, tuple[Any, ...]], Awaitable[Wire]]
_HANDLERS: dict[Method, Handler] = {}


def _handles(method: Method) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[method] = fn
        return fn

    return register


# ---- request handlers (validated arguments: see jobcore.protocol.METHODS) ---------------


def _conn(client: _Client) -> Connection:
    assert client.conn is not None
    return client.conn


async def _domain(client: _Client, name: str) -> Domain:
    dom = client.domains.get(name)
    if dom is None:
        dom = await _conn(client).lookup_domain(name)
        dom.path_guard = client.guard  # every job this client begins on it is checked
        client.domains[name] = dom
        if len(client.domains) > HANDLE_CACHE:
            client.domains.popitem(last=False)
    return dom


async def _job(client: _Client, job_id: uuid.UUID) -> Job:
    job = client.jobs.get(job_id)
    return job if job is not None else client.remember(await _conn(client).lookup_job(job_id))


def _ref(client: _Client, job: Job) -> Wire:
    client.remember(job)
    return encode_job_ref(job.uuid, job.type, job.domain, job.state)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


@_handles(Method.LIST_DOMAINS)
async def _h_list_domains(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return [encode_domain_ref(x.name, x.uuid) for x in await _conn(c).list_domains()]


@_handles(Method.LOOKUP_DOMAIN)
async def _h_lookup_domain(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _conn(c).lookup_domain(a[0])
    return encode_domain_ref(dom.name, dom.uuid)


@_handles(Method.CREATE_DOMAIN)
async def _h_create_domain(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _conn(c).create_domain(_text(a[0]), path_guard=c.guard)
    return encode_domain_ref(dom.name, dom.uuid)


@_handles(Method.JOB_LOOKUP_BY_UUID)
async def _h_job_lookup(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return _ref(c, await _conn(c).job_lookup_by_uuid(await _domain(c, a[0]), a[1]))


@_handles(Method.LOOKUP_JOB)
async def _h_lookup_job(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return _ref(c, await _conn(c).lookup_job(a[0]))


@_handles(Method.DOMAIN_INFO)
async def _h_domain_info(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return encode_domain_info(await (await _domain(c, a[0])).info())


@_handles(Method.DOMAIN_DESTROY)
async def _h_domain_destroy(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    await (await _domain(c, a[0])).destroy()
    c.domains.pop(a[0], None)
    return None


@_handles(Method.JOB_BEGIN)
async def _h_job_begin(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    job = await (await _domain(c, a[0])).job_begin(a[1], a[2])
    # the engine logs the job's one "job began" info line; this adds who began it
    c.log.debug("job begun", job=str(job.uuid), type=str(job.type), domain=job.domain)
    return _ref(c, job)


def _ref_size(domain: str) -> int:
    """An upper bound of one job ref's wire size (the UUID, type, state and the domain's
    name): replies of refs stay within half a frame by it."""
    return 64 + len(domain.encode())


def _page_size(domain: str, limit: int) -> int:
    """Refs of one domain's jobs one page holds: ``limit`` within 1 and MAX_LIST_PAGE,
    and fewer if the domain's name is so long that they would not fit half a frame."""
    return max(1, min(limit, MAX_LIST_PAGE, MAX_FRAME // 2 // _ref_size(domain)))


@_handles(Method.LIST_JOBS)
async def _h_list_jobs(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _domain(c, a[0])
    jobs = await dom.list_jobs()
    if len(jobs) * _ref_size(dom.name) > MAX_FRAME // 2:
        raise JobError(
            f"domain '{dom.name}' has {len(jobs)} jobs, more than one reply holds: list them "
            f"page by page with '{Method.LIST_JOBS_PAGE}' (as jobcore's client does)"
        )
    return [_ref(c, j) for j in jobs]


@_handles(Method.LIST_JOBS_PAGE)
async def _h_list_jobs_page(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _domain(c, a[0])
    conn = _conn(c)
    recs, cursor = conn.engine.domain_jobs_page(dom.name, a[1], _page_size(dom.name, a[2]))
    return [[_ref(c, Job(conn, r)) for r in recs], cursor]


@_handles(Method.FIND_JOBS)
async def _h_find_jobs(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    conn = _conn(c)
    refs: list[Wire] = []
    size = 0
    for rec in conn.engine.find_jobs(uuid_prefix(a[0]), max(1, min(a[1], MAX_LIST_PAGE))):
        size += _ref_size(rec.domain)
        if refs and size > MAX_FRAME // 2:
            break  # the caller asked for more than a reply holds: it gets the first ones
        refs.append(_ref(c, Job(conn, rec)))
    return refs


def _domain_call(name: str) -> Handler:
    """A legacy virDomain call: the Domain method ``name`` with the request's other
    arguments, its plain result sent back as is."""

    async def handler(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
        result: Wire = await getattr(await _domain(c, a[0]), name)(*a[1:])
        return result

    return handler


for _method, _name in (
    (Method.LEGACY_JOB_INFO, "job_info"),
    (Method.LEGACY_JOB_STATS, "job_stats"),
    (Method.LEGACY_ABORT_JOB, "abort_job"),
    (Method.BACKUP_BEGIN, "backup_begin"),
    (Method.BACKUP_GET_XML_DESC, "backup_get_xml_desc"),
    (Method.BLOCK_JOB_INFO, "block_job_info"),
    (Method.BLOCK_JOB_ABORT, "block_job_abort"),
    (Method.BLOCK_PULL, "block_pull"),
    (Method.BLOCK_COMMIT, "block_commit"),
):
    _HANDLERS[_method] = _domain_call(_name)


@_handles(Method.JOB_INFO)
async def _h_job_info(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return encode_job_info(await (await _job(c, a[0])).info())


@_handles(Method.JOB_STATS)
async def _h_job_stats(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return await (await _job(c, a[0])).stats()


@_handles(Method.JOB_WAIT)
async def _h_job_wait(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return encode_job_info(await (await _job(c, a[0])).wait(a[1]))


def _verb(name: str) -> Handler:
    async def handler(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
        job = await _job(c, a[0])
        await getattr(job, name)()
        c.log.debug("job verb", job=str(job.uuid), verb=name)  # info: begin and end only
        return None

    return handler


for _method, _name in (
    (Method.JOB_ABORT, "abort"),
    (Method.JOB_PAUSE, "pause"),
    (Method.JOB_RESUME, "resume"),
    (Method.JOB_COMPLETE, "complete"),
):
    _HANDLERS[_method] = _verb(_name)


@_handles(Method.JOB_SET_SPEED)
async def _h_set_speed(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    await (await _job(c, a[0])).set_speed(a[1] or None)
    return None


@_handles(Method.JOB_XML_DESC)
async def _h_xml_desc(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return await (await _job(c, a[0])).xml_desc()


#: Methods whose reply may be big (XML, lists, typed parameters): see MAX_BULKY. The others
#: reply with a few hundred bytes at most (a ref, a job's info, nil).
_BULKY = frozenset(
    {
        Method.LIST_DOMAINS,
        Method.DOMAIN_INFO,
        Method.LIST_JOBS,
        Method.LIST_JOBS_PAGE,
        Method.FIND_JOBS,
        Method.LEGACY_JOB_STATS,
        Method.BACKUP_GET_XML_DESC,
        Method.BLOCK_JOB_INFO,
        Method.JOB_STATS,
        Method.JOB_XML_DESC,
    }
)

_MISSING = set(Method) - set(_HANDLERS) - {Method.HELLO, Method.SUBSCRIBE, Method.UNSUBSCRIBE}
assert not _MISSING, f"methods without a handler: {_MISSING}"
