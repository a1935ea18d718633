"""The request handlers, one per ``jobcore.methods.Method`` (registered in ``_HANDLERS``):
each takes the calling session and the call's validated arguments."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from jobcore import constants as C
from jobcore.daemon.config import HANDLE_CACHE, MAX_LIST_PAGE
from jobcore.daemon.fleet import FleetJob
from jobcore.daemon.sessions import _Client
from jobcore.errors import AccessDenied, JobError, NoSuchDomain, NoSuchJob
from jobcore.info import JobInfo
from jobcore.local import LocalConnection, LocalDomain, LocalJob
from jobcore.methods import Method, On, Result, uuid_prefix
from jobcore.protocol import MAX_FRAME, DomainRef, Wire, encode_job_ref, encode_value

Handler = Callable[[_Client, tuple[Any, ...]], Awaitable[Wire]]
_HANDLERS: dict[Method, Handler] = {}


def _handles(method: Method) -> Callable[[Handler], Handler]:
    """Serve ``method`` with the decorated function instead of the handler its entry in
    jobcore.methods implies (see the request handlers at the end)."""

    def register(fn: Handler) -> Handler:
        _HANDLERS[method] = fn
        return fn

    return register


# ---- request handlers (validated arguments: see jobcore.methods) ------------------------
#
# Every call of jobcore.methods is served by ``getattr(handle, call.attr)(*args)`` on the
# session's in-process handle (its connection, a domain by name, a job by UUID), its result
# encoded by the table's result type. ``@_handles`` overrides that for the calls that need
# more of jobd (path guards, handle caches, paging within a frame); hello, subscribe,
# unsubscribe and resume are served by the read loop itself (Daemon._accept).


def _conn(client: _Client) -> LocalConnection:
    assert client.conn is not None
    return client.conn


async def _domain(client: _Client, name: str) -> LocalDomain:
    dom = client.domains.get(name)
    if dom is None:
        dom = await _conn(client).lookup_domain(name)
        dom.path_guard = client.guard  # every job this client begins on it is checked
        client.domains[name] = dom
        if len(client.domains) > HANDLE_CACHE:
            client.domains.popitem(last=False)
    return dom


async def _job(client: _Client, job_id: uuid.UUID) -> LocalJob | FleetJob:
    """The job with that UUID: on the session's driver connection, else on any other
    jobd serves (job UUIDs are unique daemon-wide; design/daemon.md "Recovery at start"),
    else, in a fleet, on another host (a FleetJob: design/fleet.md "Commands")."""
    job: LocalJob | FleetJob | None = client.jobs.get(job_id)
    if job is not None:
        return job
    try:
        job = await _conn(client).lookup_job(job_id)
    except NoSuchJob:
        job = None if client.elsewhere is None else client.elsewhere(job_id)
        if job is None:
            job = await _fleet_job(client, job_id)
        if job is None:
            raise
    return client.remember(job)


async def _fleet_job(client: _Client, job_id: uuid.UUID) -> FleetJob | None:
    """Another host's job ``job_id`` (None: not in a fleet, or no other host has it)."""
    if client.fleet is None or job_id == C.LEGACY_DOMAIN_JOB_UUID:
        return None
    return await client.fleet.lookup(job_id)


def _ref(client: _Client, job: LocalJob | FleetJob) -> Wire:
    client.remember(job)
    return encode_job_ref(job.uuid, job.type, job.domain, job.state)


def _dom_ref(dom: LocalDomain) -> Wire:
    return encode_value(DomainRef(dom.name, dom.uuid))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _encoder(result: Result) -> Callable[[_Client, Any], Wire]:
    """How a handler's result of this type goes on the wire."""
    if result is Result.DOMAIN_REF:
        return lambda c, dom: _dom_ref(dom)
    if result is Result.DOMAIN_REFS:
        return lambda c, doms: [_dom_ref(x) for x in doms]
    if result is Result.JOB_REF:
        return _ref
    if result is Result.JOB_REFS:
        return lambda c, jobs: [_ref(c, j) for j in jobs]
    if result in (Result.CHECKPOINT_REF, Result.OPT_CHECKPOINT_REF):
        return lambda c, cp: None if cp is None else cp.name
    if result is Result.CHECKPOINT_REFS:
        return lambda c, cps: [cp.name for cp in cps]
    if result in (
        Result.JOB_INFO,
        Result.DOMAIN_INFO,
        Result.HOST_INFO,
        Result.HOST_INFOS,
        Result.EXPLANATION,
        Result.GROUP_INFO,
    ):
        return lambda c, value: encode_value(value)
    if result is Result.GROUP_REF:  # groups: a group travels as its UUID
        return lambda c, group: group.uuid.bytes
    return lambda c, value: value  # already plain: nil, ints, text, typed params


def _table_handler(method: Method) -> Handler:
    """The handler the method table implies: the handle's method, its result encoded."""
    call = method.value
    assert call.attr is not None, f"'{method}' has no method to call"
    attr, encode = call.attr, _encoder(call.result)
    if call.on is On.CONNECTION:

        async def on_connection(c: _Client, a: tuple[Any, ...]) -> Wire:
            return encode(c, await getattr(_conn(c), attr)(*a))

        return on_connection
    if call.on is On.DOMAIN:

        async def on_domain(c: _Client, a: tuple[Any, ...]) -> Wire:
            return encode(c, await getattr(await _domain(c, a[0]), attr)(*a[1:]))

        return on_domain
    if call.on is On.CHECKPOINT:

        async def on_checkpoint(c: _Client, a: tuple[Any, ...]) -> Wire:
            checkpoint = await (await _domain(c, a[0])).checkpoint_lookup(a[1])
            return encode(c, await getattr(checkpoint, attr)(*a[2:]))

        return on_checkpoint

    if call.on is On.GROUP:  # groups: a group of the session's driver connection

        async def on_group(c: _Client, a: tuple[Any, ...]) -> Wire:
            group = await _conn(c).job_group_lookup(a[0])
            return encode(c, await getattr(group, attr)(*a[1:]))

        return on_group

    async def on_job(c: _Client, a: tuple[Any, ...]) -> Wire:
        job = await _job(c, a[0])
        result = await getattr(job, attr)(*a[1:])
        if call.writes:  # a verb; info lines: begin and end only
            c.log.debug("job verb", job=str(job.uuid), verb=attr)
        return encode(c, result)

    return on_job


@_handles(Method.CREATE_DOMAIN)
async def _h_create_domain(c: _Client, a: tuple[Any, ...]) -> Wire:
    return _dom_ref(await _conn(c).create_domain(_text(a[0]), path_guard=c.guard))


@_handles(Method.QEMU_MONITOR_COMMAND)
async def _h_qemu_monitor_command(c: _Client, a: tuple[Any, ...]) -> Wire:
    # HMP/QMP can open any file as jobd's uid (drive_add, blockdev-add): no path guard
    # can see into it, so a confined client may not use it (as libvirt's ACL treats it)
    if c.guard is not None:
        raise AccessDenied(
            "qemuMonitorCommand runs anything on QEMU as jobd's uid: only jobd's own uid "
            "and root may use it"
        )
    result: str = await (await _domain(c, a[0])).qemu_monitor_command(a[1], a[2])
    return result


@_handles(Method.LOOKUP_JOB)
async def _h_lookup_job(c: _Client, a: tuple[Any, ...]) -> Wire:
    return _ref(c, await _job(c, a[0]))  # on any driver connection (see _job)


@_handles(Method.JOB_LOOKUP_BY_UUID)
async def _h_job_lookup(c: _Client, a: tuple[Any, ...]) -> Wire:
    try:
        return _ref(c, await _conn(c).job_lookup_by_uuid(await _domain(c, a[0]), a[1]))
    except (NoSuchJob, NoSuchDomain):
        # in a fleet: a job of the domain of that name on another host
        remote = await _fleet_job(c, a[1])
        if remote is None or remote.domain != a[0]:
            raise
        return _ref(c, remote)


@_handles(Method.DOMAIN_DESTROY)
async def _h_domain_destroy(c: _Client, a: tuple[Any, ...]) -> Wire:
    await (await _domain(c, a[0])).destroy()
    c.domains.pop(a[0], None)
    return None


@_handles(Method.JOB_BEGIN)
async def _h_job_begin(c: _Client, a: tuple[Any, ...]) -> Wire:
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
async def _h_list_jobs(c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _domain(c, a[0])
    jobs = await dom.list_jobs()
    if len(jobs) * _ref_size(dom.name) > MAX_FRAME // 2:
        raise JobError(
            f"domain '{dom.name}' has {len(jobs)} jobs, more than one reply holds: list them "
            f"page by page with '{Method.LIST_JOBS_PAGE}' (as jobcore's client does)"
        )
    return [_ref(c, j) for j in jobs]


@_handles(Method.LIST_JOBS_PAGE)
async def _h_list_jobs_page(c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _domain(c, a[0])
    conn = _conn(c)
    recs, cursor = conn.engine.domain_jobs_page(dom.name, a[1], _page_size(dom.name, a[2]))
    return [[_ref(c, LocalJob(conn, r)) for r in recs], cursor]


@_handles(Method.FIND_JOBS)
async def _h_find_jobs(c: _Client, a: tuple[Any, ...]) -> Wire:
    conn = _conn(c)
    digits, limit = uuid_prefix(a[0]), max(1, min(a[1], MAX_LIST_PAGE))
    found: list[LocalJob | FleetJob] = [
        LocalJob(conn, r) for r in conn.engine.find_jobs(digits, limit)
    ]
    if c.fleet is not None:  # and other hosts' jobs, in one UUID order
        found += await c.fleet.find(digits, limit)
        found = sorted({j.uuid: j for j in reversed(found)}.values(), key=lambda j: j.uuid.hex)
    refs: list[Wire] = []
    size = 0
    for job in found[:limit]:
        size += _ref_size(job.domain)
        if refs and size > MAX_FRAME // 2:
            break  # the caller asked for more than a reply holds: it gets the first ones
        refs.append(_ref(c, job))
    return refs


def _info_size(info: JobInfo) -> int:
    """An upper bound of one JobInfo's wire size (its numbers, UUID, names and error)."""
    text = len(info.domain) + len(info.host) + len(info.type) + len(info.errmsg or "")
    return 160 + 4 * text  # a character is at most 4 bytes of UTF-8


@_handles(Method.LIST_FLEET_JOBS)
async def _h_list_fleet_jobs(c: _Client, a: tuple[Any, ...]) -> Wire:
    """A page of every member's jobs within half a frame: a page whose infos (long
    error messages) would not fit is asked again for as many as fit, so the cursor
    stays the fleet's own (the seq of the page's last job)."""
    conn = _conn(c)
    limit = max(1, min(a[1], MAX_LIST_PAGE))
    while True:
        infos, cursor = await conn.list_fleet_jobs(a[0], limit)
        fit, size = 0, 0
        for info in infos:
            size += _info_size(info)
            if size > MAX_FRAME // 2:
                break
            fit += 1
        if fit == len(infos) or limit == 1:
            return [[encode_value(i) for i in infos], cursor]
        limit = max(1, min(fit, limit - 1))


# groups


@_handles(Method.JOB_GROUP_BEGIN)
async def _h_job_group_begin(c: _Client, a: tuple[Any, ...]) -> Wire:
    # the session's path guard sees every member's files, as JobBegin's domain handles do
    group = await _conn(c).job_group_begin(a[0], a[1], path_guard=c.guard)
    c.log.debug("job group begun", group=str(group.uuid))
    return group.uuid.bytes


@_handles(Method.JOB_GROUP_EXPLAIN)
async def _h_job_group_explain(c: _Client, a: tuple[Any, ...]) -> Wire:
    # explain runs begin's checks: the session's path guard sees every member's files
    ex = await _conn(c).job_group_explain(a[0], a[1], path_guard=c.guard)
    return encode_value(ex)


for _method in Method:
    if _method.value.on is not On.SESSION and _method not in _HANDLERS:
        _HANDLERS[_method] = _table_handler(_method)

#: Methods whose reply may be big (XML, lists, typed parameters): see MAX_BULKY. The others
#: reply with a few hundred bytes at most (a ref, a job's info, nil).
_BULKY = frozenset(
    m
    for m in Method
    if m.value.result
    in (Result.DOMAIN_REFS, Result.DOMAIN_INFO, Result.JOB_REFS, Result.JOB_PAGE, Result.PARAMS,
        Result.TEXT, Result.CHECKPOINT_REFS, Result.INFO_PAGE, Result.HOST_INFOS)
)  # fmt: skip
