"""The method table (jobcore.methods) against everything that must agree with it: the
interfaces of jobcore.api, both implementations, the blocking facade, jobd's dispatch and
read-only rule, and design/daemon.md's method list."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import jobcore
from jobcore import api, facade, local, remote
from jobcore.daemon import handlers
from jobcore.methods import Method, On, Result, render_markdown

DAEMON_MD = Path(__file__).parent.parent / "design" / "daemon.md"

INTERFACE = {
    On.CONNECTION: api.Connection,
    On.DOMAIN: api.Domain,
    On.JOB: api.Job,
    On.CHECKPOINT: api.Checkpoint,
    On.GROUP: api.JobGroup,
}
IMPLS = {
    On.CONNECTION: (local.LocalConnection, remote.RemoteConnection),
    On.DOMAIN: (local.LocalDomain, remote.RemoteDomain),
    On.JOB: (local.LocalJob, remote.RemoteJob),
    On.CHECKPOINT: (local.LocalCheckpoint, remote.RemoteCheckpoint),
    On.GROUP: (local.LocalJobGroup, remote.RemoteJobGroup),
}
BLOCKING = {
    On.CONNECTION: facade.BlockingConnection,
    On.DOMAIN: facade.BlockingDomain,
    On.CHECKPOINT: facade.BlockingCheckpoint,
}
#: interface methods that are no call of their own: a typed spec travels as its job XML
#: (job_begin), a job's events are a subscription filtered on it (subscribe)
NOT_CALLS = {"job_begin_spec", "events"}

CALLS = [m for m in Method if m.value.attr is not None]


def _params(fn: object, skip: int = 1) -> list[str]:
    """Parameter names after the first ``skip``; keyword-only options that never go on
    the wire (an in-process path guard) are left out."""
    params = list(inspect.signature(fn).parameters.values())[skip:]  # type: ignore[arg-type]
    local_only = {"path_guard"}
    return [p.name for p in params if p.name not in local_only]


def _api_args(m: Method) -> list[str]:
    """The interface's parameters for a call: its args, except a page's cursor and limit
    (the client asks page after page)."""
    return [] if m.value.result is Result.JOB_PAGE else [n for n, _ in m.value.args]


@pytest.mark.parametrize("method", CALLS, ids=str)
def test_interface_and_implementations_take_the_tables_arguments(method: Method) -> None:
    call = method.value
    attr = call.attr
    assert attr is not None
    iface = INTERFACE[call.on]
    assert attr in vars(iface), f"{iface.__name__} has no {attr} for '{method}'"
    assert _params(vars(iface)[attr]) == _api_args(method)
    for impl in IMPLS[call.on]:
        assert _params(vars(impl)[attr]) == _api_args(method), impl.__name__


def test_every_interface_method_is_a_call_of_the_table() -> None:
    served = {(m.value.on, m.value.attr) for m in CALLS}
    for on, iface in INTERFACE.items():
        for name, member in vars(iface).items():
            if name.startswith("_") or isinstance(member, property) or not callable(member):
                continue
            assert (on, name) in served or name in NOT_CALLS, f"{iface.__name__}.{name}"


def _same(facade_name: str, table_name: str) -> bool:
    a, b = facade_name.replace("_", "").lower(), table_name.replace("_", "").lower()
    return a.startswith(b)  # job_uuid for job, backupXML for backup_xml


@pytest.mark.parametrize("method", [m for m in CALLS if m.value.blocking], ids=str)
def test_blocking_facade_has_each_call(method: Method) -> None:
    call = method.value
    assert call.blocking is not None
    owner = BLOCKING.get(call.on)
    if owner is not None and call.blocking in vars(owner):
        params = _params(vars(owner)[call.blocking])
    else:  # a module function taking the handle first (JobBegin(dom, …), JobAbort(job))
        fn = getattr(facade, call.blocking)
        assert getattr(jobcore, call.blocking) is fn, "not exported by jobcore"
        # a connection call's module function takes the domain, its first argument
        params = _params(fn, skip=0 if call.on is On.CONNECTION else 1)
    want = _api_args(method)
    if params[len(want) :] == ["flags"]:  # libvirt's names take a flags word
        params = params[: len(want)]
    assert len(params) == len(want), (params, want)
    assert all(_same(p, w) for p, w in zip(params, want, strict=True)), (params, want)


def test_jobd_serves_every_call_and_refuses_writes_read_only() -> None:
    for m in Method:
        if m.value.on is On.SESSION:
            assert m not in handlers._HANDLERS
        else:
            assert m in handlers._HANDLERS, f"jobd does not serve '{m}'"
    writes = {str(m) for m in Method if m.value.writes}
    assert "job_abort" in writes and "job_info" not in writes
    assert {"job_begin", "create_domain", "domain_destroy"} <= writes
    assert {"checkpoint_create", "checkpoint_delete"} <= writes
    assert "checkpoint_xml_desc" not in writes and "list_checkpoints" not in writes


def test_daemon_md_lists_the_table() -> None:
    text = DAEMON_MD.read_text()
    assert render_markdown() in text, "run: python -m jobcore.methods"


def test_method_names_are_unique_and_round_trip() -> None:
    from jobcore.methods import BY_NAME

    assert len(BY_NAME) == len(Method)
    assert all(BY_NAME[str(m)] is m for m in Method)
