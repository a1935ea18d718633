"""The method table: every public call of a connection, domain or job, declared once.

Each ``Method`` member is one call: its wire name, the handle it is a method of, its
arguments (name and wire type, in order), whether it writes (refused on jobd's read-only
socket) and its result type. What is derived from it:

- jobcore.protocol validates and converts each request's arguments (``Call.args``) and
  encodes and decodes its result (``Call.result``);
- jobd dispatches a request to ``getattr(handle, call.attr)(*args)`` on the session's
  in-process handle, and refuses ``writes`` calls on the read-only socket;
- jobcore.remote's handles make the round trip (handle identity first, then ``args``)
  and turn the reply into the typed result;
- tests check the interfaces (jobcore.api), both implementations, the blocking facade
  (``Call.blocking``) and design/daemon.md's method list (``render_markdown``) against it.

How to add a call: design/daemon.md, "How to add a call".
"""

from __future__ import annotations

import enum
import uuid
from typing import Protocol

from attrs import frozen

from jobcore.errors import InvalidArgument


class Arg(enum.Enum):
    """The wire type of one request argument (validated and converted on decode)."""

    STR = "str"
    OPT_STR = "str|nil"
    TEXT = "str|bin"  # XML documents: str, or bytes as the local API accepts
    INT = "int"
    OPT_FLOAT = "float|nil"
    UUID = "uuid"
    OPT_UUID = "uuid|nil"
    OPT_STRS = "[str]|nil"
    #: [[job uuid, event seq]…], at most MAX_RESUME pairs (the resume of a subscription)
    SEQS = "[[uuid, int]…]"


#: Jobs one ``resume`` request names (a client sends several for more).
MAX_RESUME = 128


class Result(enum.Enum):
    """The wire type of a call's result (jobcore.protocol has one codec per member)."""

    NONE = "nil"
    INT = "int"
    BOOL = "bool"
    TEXT = "str"
    INTS = "[int…]"
    PARAMS = "typed params"
    DOMAIN_REF = "domain ref"
    DOMAIN_REFS = "[domain ref…]"
    DOMAIN_INFO = "DomainInfo"
    JOB_REF = "job ref"
    JOB_REFS = "[job ref…]"
    JOB_PAGE = "[[job ref…], next cursor|nil]"
    JOB_INFO = "JobInfo"
    #: a page of every fleet member's jobs (jobd bounds it to a frame) and the next cursor
    INFO_PAGE = "[[JobInfo…], next cursor|nil]"
    HOST_INFOS = "[HostInfo…]"
    HOST_INFO = "HostInfo"
    HELLO = "server hello"
    # checkpoints: a checkpoint travels as its name (the domain is the caller's handle's)
    CHECKPOINT_REF = "checkpoint ref"
    CHECKPOINT_REFS = "[checkpoint ref…]"
    OPT_CHECKPOINT_REF = "checkpoint ref|nil"
    # groups
    GROUP_REF = "group ref"
    GROUP_INFO = "GroupInfo"
    # explain
    EXPLANATION = "Explanation"


class On(enum.Enum):
    """The handle a call is a method of; its identity goes first on the wire."""

    SESSION = "session"  # the protocol itself (hello, subscriptions): no handle
    CONNECTION = "connection"  # no identity
    DOMAIN = "domain"  # the domain's name
    JOB = "job"  # the job's UUID
    CHECKPOINT = "checkpoint"  # its domain's name and its own
    GROUP = "group"  # the job group's UUID


@frozen
class Call:
    """One entry of the method table (see the module docstring)."""

    #: the name on the wire
    name: str
    on: On
    #: the method of the interface (jobcore.api) this call serves; None: wire-only
    attr: str | None
    #: (name, wire type) of each argument after the handle's identity
    args: tuple[tuple[str, Arg], ...]
    #: begins, changes or ends a job or a domain: refused on the read-only socket
    writes: bool
    result: Result
    #: the blocking facade's name for it (a BlockingConnection, BlockingDomain or
    #: BlockingCheckpoint method, or a jobcore module function for job calls)
    blocking: str | None = None
    #: one line for design/daemon.md when the name and types do not say it all
    note: str = ""

    @property
    def wire_args(self) -> tuple[Arg, ...]:
        """Every argument's wire type, the handle's identity first."""
        head = {
            On.DOMAIN: (Arg.STR,),
            On.JOB: (Arg.UUID,),
            On.CHECKPOINT: (Arg.STR, Arg.STR),
            On.GROUP: (Arg.UUID,),
        }.get(self.on, ())
        return head + tuple(kind for _, kind in self.args)


C, D, J, S, K, G = On.CONNECTION, On.DOMAIN, On.JOB, On.SESSION, On.CHECKPOINT, On.GROUP
A, R = Arg, Result


class Method(enum.Enum):
    """Every call of the jobd protocol; ``method.value`` is its ``Call``."""

    HELLO = Call(
        "hello", S, None, (("version", A.INT), ("driver_uri", A.STR)), False, R.HELLO,
        note="first request of a connection; attaches a driver connection",
    )  # fmt: skip
    SUBSCRIBE = Call(
        "subscribe", C, "subscribe",
        (("domain", A.OPT_STR), ("job", A.OPT_UUID), ("types", A.OPT_STRS),
         ("kinds", A.OPT_STRS), ("maxlen", A.INT)),
        False, R.NONE, note="the subscription's id is the request id",
    )  # fmt: skip
    UNSUBSCRIBE = Call("unsubscribe", S, None, (("sub_id", A.INT),), False, R.NONE)
    RESUME = Call(
        "resume", S, None, (("sub_id", A.INT), ("seen", A.SEQS)), False, R.INT,
        note="after a reconnect: each job's last event seq seen; the subscription gets the "
        "job's FINAL or current STATE event if newer; the reply counts them",
    )  # fmt: skip
    # connection
    LIST_DOMAINS = Call("list_domains", C, "list_domains", (), False, R.DOMAIN_REFS,
                        "listAllDomains")  # fmt: skip
    LOOKUP_DOMAIN = Call("lookup_domain", C, "lookup_domain", (("name", A.STR),), False,
                         R.DOMAIN_REF, "lookupByName")  # fmt: skip
    CREATE_DOMAIN = Call("create_domain", C, "create_domain", (("xml", A.TEXT),), True,
                         R.DOMAIN_REF, "createXML")  # fmt: skip
    JOB_LOOKUP_BY_UUID = Call(
        "job_lookup_by_uuid", C, "job_lookup_by_uuid", (("dom", A.STR), ("job", A.UUID)),
        False, R.JOB_REF, "JobLookupByUUID",
        note="the legacy domain job UUID resolves to the domain's legacy job",
    )  # fmt: skip
    LOOKUP_JOB = Call("lookup_job", C, "lookup_job", (("job", A.UUID),), False, R.JOB_REF,
                      note="a job of any domain")  # fmt: skip
    FIND_JOBS = Call("find_jobs", C, "find_jobs", (("prefix", A.STR), ("limit", A.INT)),
                     False, R.JOB_REFS, note="UUID prefix (hex digits); in UUID order")  # fmt: skip
    # the fleet (jobd on a postgresql:// store; design/fleet.md): every member's jobs and hosts
    LIST_FLEET_JOBS = Call(
        "list_fleet_jobs", C, "list_fleet_jobs", (("cursor", A.INT), ("limit", A.INT)), False,
        R.INFO_PAGE, "listFleetJobs",
        note="every host's jobs in begin order; cursor -1: the start; the client asks page by page",
    )  # fmt: skip
    FLEET_HOSTS = Call("fleet_hosts", C, "fleet_hosts", (), False, R.HOST_INFOS, "fleetHosts",
                       note="the fleet's members, by name")  # fmt: skip
    FENCE_HOST = Call(
        "fence_host", C, "fence_host", (("name", A.STR), ("reason", A.OPT_STR), ("flags", A.INT)),
        True, R.HOST_INFO, "fenceHost",
        note="releases the host's claims, fails its active jobs; a LIVE one needs JOB_FENCE_FORCE",
    )  # fmt: skip
    # domain
    DOMAIN_INFO = Call("domain_info", D, "info", (), False, R.DOMAIN_INFO)
    DOMAIN_DESTROY = Call("domain_destroy", D, "destroy", (), True, R.NONE, "destroy")
    # domain description and the QEMU monitor (slice domxml)
    DOMAIN_XML_DESC = Call("domain_xml_desc", D, "xml_desc", (("flags", A.INT),), False,
                           R.TEXT, "XMLDesc", note="libvirt's domain XML, live chains")  # fmt: skip
    DOMAIN_IS_ACTIVE = Call("domain_is_active", D, "is_active", (), False, R.BOOL, "isActive")
    QEMU_MONITOR_COMMAND = Call(
        "qemu_monitor_command", D, "qemu_monitor_command", (("cmd", A.STR), ("flags", A.INT)),
        True, R.TEXT, "qemuMonitorCommand",
        note="qemu only; flags HMP: an HMP line, else QMP JSON; refused to confined clients",
    )  # fmt: skip
    JOB_BEGIN = Call("job_begin", D, "job_begin", (("job_xml", A.TEXT), ("flags", A.INT)),
                     True, R.JOB_REF, "JobBegin")  # fmt: skip
    LIST_JOBS_PAGE = Call(
        "list_jobs_page", D, "list_jobs", (("cursor", A.INT), ("limit", A.INT)), False,
        R.JOB_PAGE, "listJobs", note="cursor -1: the start; the client asks page by page",
    )  # fmt: skip
    LIST_JOBS = Call("list_jobs", D, None, (), False, R.JOB_REFS,
                     note="older clients; refused past half a frame")  # fmt: skip
    LEGACY_JOB_INFO = Call("legacy_job_info", D, "job_info", (), False, R.INTS, "jobInfo")
    LEGACY_JOB_STATS = Call("legacy_job_stats", D, "job_stats", (("flags", A.INT),), False,
                            R.PARAMS, "jobStats")  # fmt: skip
    LEGACY_ABORT_JOB = Call("legacy_abort_job", D, "abort_job", (), True, R.INT, "abortJob")
    BACKUP_BEGIN = Call(
        "backup_begin", D, "backup_begin",
        (("backup_xml", A.OPT_STR), ("checkpoint_xml", A.OPT_STR), ("flags", A.INT)),
        True, R.INT, "backupBegin",
    )  # fmt: skip
    BACKUP_GET_XML_DESC = Call("backup_get_xml_desc", D, "backup_get_xml_desc",
                               (("flags", A.INT),), False, R.TEXT, "backupGetXMLDesc")  # fmt: skip
    BLOCK_JOB_INFO = Call("block_job_info", D, "block_job_info",
                          (("disk", A.STR), ("flags", A.INT)), False, R.PARAMS,
                          "blockJobInfo")  # fmt: skip
    BLOCK_JOB_ABORT = Call("block_job_abort", D, "block_job_abort",
                           (("disk", A.STR), ("flags", A.INT)), True, R.INT,
                           "blockJobAbort")  # fmt: skip
    BLOCK_PULL = Call("block_pull", D, "block_pull",
                      (("disk", A.STR), ("bandwidth", A.INT), ("flags", A.INT)), True, R.INT,
                      "blockPull")  # fmt: skip
    BLOCK_COMMIT = Call(
        "block_commit", D, "block_commit",
        (("disk", A.STR), ("base", A.OPT_STR), ("top", A.OPT_STR), ("bandwidth", A.INT),
         ("flags", A.INT)),
        True, R.INT, "blockCommit",
    )  # fmt: skip
    # job
    JOB_INFO = Call("job_info", J, "info", (), False, R.JOB_INFO, "JobGetInfo")
    JOB_STATS = Call("job_stats", J, "stats", (), False, R.PARAMS, "JobGetStats")
    JOB_WAIT = Call("job_wait", J, "wait", (("timeout", A.OPT_FLOAT),), False, R.JOB_INFO,
                    "JobWait")  # fmt: skip
    JOB_ABORT = Call("job_abort", J, "abort", (), True, R.NONE, "JobAbort")
    JOB_PAUSE = Call("job_pause", J, "pause", (), True, R.NONE, "JobPause")
    JOB_RESUME = Call("job_resume", J, "resume", (), True, R.NONE, "JobResume")
    JOB_COMPLETE = Call("job_complete", J, "complete", (), True, R.NONE, "JobComplete")
    JOB_SET_SPEED = Call("job_set_speed", J, "set_speed", (("bandwidth", A.INT),), True,
                         R.NONE, "JobSetSpeed", note="bytes/s; 0 lifts the limit")  # fmt: skip
    JOB_XML_DESC = Call("job_xml_desc", J, "xml_desc", (), False, R.TEXT, "JobGetXMLDesc")
    # checkpoints (jobcore.checkpoints): a domain's, then one checkpoint's
    CHECKPOINT_CREATE = Call("checkpoint_create", D, "checkpoint_create",
                             (("xml", A.TEXT), ("flags", A.INT)), True, R.CHECKPOINT_REF,
                             "checkpointCreateXML")  # fmt: skip
    LIST_CHECKPOINTS = Call("list_checkpoints", D, "list_checkpoints", (("flags", A.INT),),
                            False, R.CHECKPOINT_REFS, "listAllCheckpoints",
                            note="in creation order")  # fmt: skip
    CHECKPOINT_LOOKUP = Call("checkpoint_lookup", D, "checkpoint_lookup", (("name", A.STR),),
                             False, R.CHECKPOINT_REF, "checkpointLookupByName")  # fmt: skip
    CHECKPOINT_XML_DESC = Call("checkpoint_xml_desc", K, "xml_desc", (("flags", A.INT),),
                               False, R.TEXT, "getXMLDesc")  # fmt: skip
    CHECKPOINT_PARENT = Call("checkpoint_parent", K, "parent", (), False,
                             R.OPT_CHECKPOINT_REF, "getParent")  # fmt: skip
    CHECKPOINT_DELETE = Call("checkpoint_delete", K, "delete", (("flags", A.INT),), True,
                             R.NONE, "delete")  # fmt: skip
    # groups (jobcore.groups): begun on a connection, then the group's own calls
    JOB_GROUP_BEGIN = Call("job_group_begin", C, "job_group_begin",
                           (("group_xml", A.TEXT), ("flags", A.INT)), True, R.GROUP_REF,
                           "JobGroupBegin",
                           note="all members admitted (or queued) or none")  # fmt: skip
    JOB_GROUP_EXPLAIN = Call("job_group_explain", C, "job_group_explain",
                             (("group_xml", A.TEXT), ("flags", A.INT)), False, R.EXPLANATION,
                             "JobGroupExplain",
                             note="what JobGroupBegin would do now; changes nothing")  # fmt: skip
    JOB_GROUP_LOOKUP = Call("job_group_lookup", C, "job_group_lookup", (("group", A.UUID),),
                            False, R.GROUP_REF)  # fmt: skip
    JOB_GROUP_JOBS = Call("job_group_jobs", G, "jobs", (), False, R.JOB_REFS,
                          "JobGroupGetJobs", note="in document order")  # fmt: skip
    JOB_GROUP_INFO = Call("job_group_info", G, "info", (), False, R.GROUP_INFO,
                          "JobGroupGetInfo")  # fmt: skip
    JOB_GROUP_WAIT = Call("job_group_wait", G, "wait", (("timeout", A.OPT_FLOAT),), False,
                          R.GROUP_INFO, "JobGroupWait")  # fmt: skip
    JOB_GROUP_ABORT = Call("job_group_abort", G, "abort", (), True, R.NONE, "JobGroupAbort",
                           note="aborts every active member")  # fmt: skip
    # explain
    JOB_EXPLAIN = Call(
        "job_explain", D, "job_explain", (("job_xml", A.TEXT), ("flags", A.INT)), False,
        R.EXPLANATION, "JobExplain",
        note="what JobBegin would do now (admit, queue, conflict, preempt); changes nothing",
    )  # fmt: skip
    JOB_EXPLAIN_QUEUED = Call(
        "job_explain_queued", J, "explain", (), False, R.EXPLANATION,
        note="a queued job: what it waits for, its position; blocking: JobExplain(job)",
    )  # fmt: skip

    def __str__(self) -> str:
        return self.value.name

    @property
    def call(self) -> Call:
        return self.value


del A, R

#: each method by its wire name (what a request names)
BY_NAME: dict[str, Method] = {m.value.name: m for m in Method}


def render_markdown() -> str:
    """design/daemon.md's method list (a test checks that the document holds it)."""
    lines = [
        "| method | on | args | result | read-only socket | blocking facade |",
        "|---|---|---|---|---|---|",
    ]
    for m in Method:
        c = m.value
        cells = (
            f"`{c.name}`",
            c.on.value,
            ", ".join(f"{name}: {kind.value}" for name, kind in c.args) or "–",
            c.result.value + (f" ({c.note})" if c.note else ""),
            "**no**" if c.writes else "yes",
            f"`{c.blocking}`" if c.blocking else "",
        )
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# ---- argument helpers shared by both implementations ------------------------------------


class Named(Protocol):
    """What a call taking a domain handle needs of it: its name (what goes on the wire)."""

    @property
    def name(self) -> str: ...


def as_uuid(value: str | bytes | uuid.UUID) -> uuid.UUID:
    """A UUID from its string form, 16 raw bytes, or a uuid.UUID."""
    try:
        if isinstance(value, uuid.UUID):
            return value
        if isinstance(value, bytes | bytearray):
            return uuid.UUID(bytes=bytes(value))
        return uuid.UUID(str(value))
    except (ValueError, TypeError):
        raise InvalidArgument(f"invalid job UUID {value!r}") from None


def uuid_prefix(text: str) -> str:
    """The hex digits of a UUID prefix (dashes dropped, lower case); InvalidArgument if
    it is not 1 to 32 hex digits."""
    digits = text.replace("-", "").lower()
    if not 1 <= len(digits) <= 32 or any(ch not in "0123456789abcdef" for ch in digits):
        raise InvalidArgument(f"'{text}' is not a UUID prefix (1 to 32 hex digits)")
    return digits


def _rewrite_daemon_md(path: str = "design/daemon.md") -> None:
    """Put ``render_markdown()`` between the generated-list markers of ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n", text.index("<!-- generated from jobcore.methods")) + 1
    end = text.index("<!-- end of generated method list -->")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + render_markdown() + text[end:])


if __name__ == "__main__":
    _rewrite_daemon_md()
