"""Hostile and malformed input: every failure is an XMLError that says what and where,
and nothing reads a file or the network."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from attrs import frozen
from lxml import etree

from jobcore.errors import JobError, XMLError
from jobcore.registry import registry
from jobcore.spec import JobOptions, JobType
from jobcore.types import JobTypeInfo
from jobcore.xml import (
    format_backup,
    format_checkpoint,
    format_job,
    parse_backup,
    parse_checkpoint,
    parse_job,
)
from jobcore.xml._parse import MAX_DOCUMENT_BYTES
from jobcore.xml.domain import parse_domain

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "libvirt"

Parser = Callable[[str | bytes], object]
PARSERS: list[Parser] = [parse_job, parse_backup, parse_checkpoint, parse_domain]


def refused(doc: str | bytes, parser: Parser = parse_job) -> XMLError:
    with pytest.raises(XMLError) as err:
        parser(doc)
    assert isinstance(err.value, JobError)
    return err.value


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<job type='blockpull'><disk name='&lol4;'/></job>"""


@pytest.mark.parametrize("parser", PARSERS)
def test_billion_laughs(parser: Parser) -> None:
    err = refused(BILLION_LAUGHS, parser)
    assert "DOCTYPE" in str(err) and err.line == 2


@pytest.mark.parametrize(
    "system", ["file:///etc/passwd", "http://127.0.0.1:9/evil.dtd", "/etc/hostname"]
)
def test_external_entity(system: str) -> None:
    doc = (
        f'<?xml version="1.0"?><!DOCTYPE job [<!ENTITY xxe SYSTEM "{system}">]>'
        "<job type='migration'><destination uri='&xxe;'/></job>"
    )
    err = refused(doc)
    assert "DOCTYPE" in str(err)
    assert "root:" not in str(err)


def test_external_dtd() -> None:
    err = refused('<!DOCTYPE job SYSTEM "http://127.0.0.1:9/job.dtd"><job type="blockpull"/>')
    assert "DOCTYPE" in str(err)


def test_parameter_entities() -> None:
    doc = (
        '<!DOCTYPE job [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p; '
        '<!ENTITY % q "<!ENTITY r \'x\'>"> %q;]><job type="blockpull"><disk name="&r;"/></job>'
    )
    assert "DOCTYPE" in str(refused(doc.encode()))


def test_doctype_in_utf16_is_still_refused() -> None:
    doc = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE job []><job type="blockpull"/>'
    err = refused(doc.encode("utf-16"))
    assert "DOCTYPE" in str(err)


def test_undeclared_entity_is_refused() -> None:
    err = refused("<job type='migration'><destination uri='&xxe;'/></job>")
    assert "xxe" in str(err) and err.line == 1


def test_xinclude_is_not_processed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_text("<disk name='vda'/>")
    doc = (
        "<job type='blockpull' xmlns:xi='http://www.w3.org/2001/XInclude'>\n"
        f"  <xi:include href='{secret}'/>\n</job>"
    )
    err = refused(doc)
    assert "include" in str(err) and err.line == 2


def test_xinclude_inside_a_kept_domain_stays_inert(tmp_path: Path) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_text("<top-secret/>")
    doc = (
        "<domaincheckpoint><name>c1</name><domain xmlns:xi='http://www.w3.org/2001/XInclude'>"
        f"<xi:include href='{secret}'/></domain></domaincheckpoint>"
    )
    parsed = parse_checkpoint(doc)
    assert parsed.domain is not None and "top-secret" not in parsed.domain


@pytest.mark.parametrize("parser", PARSERS)
def test_over_one_mib_is_refused_before_parsing(parser: Parser) -> None:
    pad = "x" * MAX_DOCUMENT_BYTES
    for doc in (f"<job type='blockpull'><!--{pad}--></job>", f"<job>{pad}".encode()):
        err = refused(doc, parser)
        assert "1 MiB" in str(err)


def test_just_under_the_limit_is_parsed() -> None:
    head = "<job type='blockpull'><disk name='vda'/><!--"
    tail = "--></job>"
    doc = head + "x" * (MAX_DOCUMENT_BYTES - len(head) - len(tail)) + tail
    assert parse_job(doc).disk == "vda"


def test_multibyte_str_counts_bytes() -> None:
    doc = (
        "<job type='blockpull'><disk name='vda'/><!--"
        + "é" * (MAX_DOCUMENT_BYTES // 2)
        + "--></job>"
    )
    assert "1 MiB" in str(refused(doc))


@pytest.mark.parametrize("depth", [70, 300, 100_000])
def test_deep_nesting(depth: int) -> None:
    doc = "<job type='blockpull'>" + "<a>" * depth + "</a>" * depth + "</job>"
    err = refused(doc)
    assert err.line == 1


def test_deep_nesting_in_a_kept_domain() -> None:
    doc = "<domaincheckpoint><domain>" + "<a>" * 100 + "</a>" * 100 + "</domain></domaincheckpoint>"
    err = refused(doc, parse_checkpoint)
    assert "deeper" in str(err)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00\x01\x02\xff\xfe\xfd" * 50,
        bytes(range(256)),
        b"\xff\xfe<\x00j\x00",
        b"<job type='blockpull'><disk name='\xff\xfe'/></job>",
        "<job type='blockpull'><disk name='\ud800'/></job>",
        "not xml at all",
        "<job",
        "<job type='blockpull'></jo>",
        "<job type='blockpull'/><job type='blockpull'/>",
    ],
)
def test_garbage(garbage: str | bytes) -> None:
    for parser in PARSERS:
        refused(garbage, parser)


@pytest.mark.parametrize("value", [None, 42, 3.5, ["<job/>"], object()])
def test_wrong_python_type(value: object) -> None:
    with pytest.raises(XMLError):
        parse_job(value)  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    doc = b"<job type='blockpull'><disk name='vda'/></job>"
    ba, mv = bytearray(doc), memoryview(doc)
    assert parse_job(ba) == parse_job(mv) == parse_job(doc)  # type: ignore[arg-type]


def test_wrong_root() -> None:
    err = refused("<domainbackup/>")
    assert "<domainbackup>" in str(err) and "<job>" in str(err) and err.line == 1
    err = refused("<job type='blockpull'/>", parse_backup)
    assert "<job>" in str(err)


def test_unknown_type() -> None:
    err = refused("<job type='nonsense'/>")
    assert "nonsense" in str(err) and "type" in str(err)
    assert "type" in str(refused("<job/>"))


@pytest.mark.parametrize("bad", ["not-a-uuid", "0b3c", "", "0b3c3a52-6d4e-4a8f-9b1c-2f6f8e0d4a1g"])
def test_invalid_uuid(bad: str) -> None:
    err = refused(f"<job type='blockpull'>\n  <uuid>{bad}</uuid><disk name='vda'/></job>")
    assert "uuid" in str(err) and err.line == 2


@pytest.mark.parametrize("form", [lambda u: u.hex, lambda u: f"{{{u}}}", lambda u: u.urn])
def test_uuid_forms(form: Callable[[uuid.UUID], str]) -> None:
    u = uuid.uuid4()
    spec = parse_job(f"<job type='blockpull'><uuid> {form(u)} </uuid><disk name='vda'/></job>")
    assert spec.uuid == u


@pytest.mark.parametrize(
    "bandwidth",
    [
        "<bandwidth unit='MB/s'>1</bandwidth>",
        "<bandwidth unit='mib/s'>1</bandwidth>",
        "<bandwidth>-1</bandwidth>",
        "<bandwidth>1.5</bandwidth>",
        "<bandwidth unit='GiB/s'>99999999999999999999</bandwidth>",
        "<bandwidth unit='GiB/s'>18446744073709551615</bandwidth>",
    ],
)
def test_bad_units(bandwidth: str) -> None:
    err = refused(f"<job type='blockpull'><disk name='vda'/>\n{bandwidth}</job>")
    assert "bandwidth" in str(err) and err.line == 2


def test_bad_downtime_unit() -> None:
    err = refused(
        "<job type='migration'><destination uri='sim:///x'/>"
        "<downtime-limit unit='min'>1</downtime-limit></job>"
    )
    assert "downtime-limit" in str(err)


@pytest.mark.parametrize(
    ("child", "what"),
    [
        ("<queue timeout='-1'/>", "timeout"),
        ("<queue timeout='inf'/>", "timeout"),
        ("<queue timeout='1e999'/>", "timeout"),
        ("<priority>1001</priority>", "priority"),
        ("<priority>high</priority>", "priority"),
        ("<retention/>", "retention"),
        ("<base index='1' file='/x'/>", "base"),
        ("<base/>", "base"),
        ("<base index='-1'/>", "base"),
        ("<top index='0'/><top index='1'/>", "top"),
        ("<uuid>6a1e2f3c-0000-4000-8000-000000000000</uuid>" * 2, "uuid"),
        ("<bogus/>", "bogus"),
    ],
)
def test_bad_common_children(child: str, what: str) -> None:
    err = refused(f"<job type='blockpull'><disk name='vda'/>{child}</job>")
    assert what in str(err)


BACKUP_HEAD = "<domainbackup mode='pull'>\n  <disks>\n"


@pytest.mark.parametrize(
    ("disks", "what", "line"),
    [
        ("<disk name='vda'/>\n<disk name='vda' backup='no'/>", "vda", 4),
        ("<disk name='vda' type='file'><target file='/t'/></disk>", "<target>", 3),
        ("<disk name='vda' type='file'><driver type='raw'/></disk>", "qcow2", 3),
        ("<disk name='vda' type='block'><scratch file='/t'/></disk>", "dev", 3),
        ("<disk name='vda' type='file'><scratch file='relative'/></disk>", "absolute", 3),
        ("<disk name='../x'/>", "disk target", 3),
        ("<disk name='vda' backupmode='full' incremental='c1'/>", "incremental", 3),
        ("<disk name='vda' backupmode='incremental'/>", "backupmode", 3),
        ("<disk name='vda' state='running'/>", "state", 3),
        (
            "<disk name='vda'><scratch file='/s'><seclabel relabel='no'><label>x</label>"
            "</seclabel></scratch></disk>",
            "seclabel",
            3,
        ),
        (
            "<disk name='vda'><scratch file='/s'><encryption format='luks'/></scratch></disk>",
            "encryption",
            3,
        ),
    ],
)
def test_bad_backups(disks: str, what: str, line: int) -> None:
    doc = f"{BACKUP_HEAD}{disks}\n  </disks>\n</domainbackup>"
    err = refused(doc, parse_backup)
    assert what in str(err), str(err)
    assert err.line == line, str(err)
    # the same inside a job, one line further down
    err = refused(f"<job type='backup'>\n{doc}</job>")
    assert err.line == line + 1


def test_disk_named_twice_is_refused_at_parse_time() -> None:
    doc = (
        "<domainbackup><disks><disk name='vda' type='file'/>"
        "<disk name='vda' type='file'/></disks></domainbackup>"
    )
    err = refused(doc, parse_backup)
    assert "vda" in str(err) and "twice" in str(err)
    err = refused(
        "<domaincheckpoint><disks><disk name='vda'/><disk name='vda'/></disks></domaincheckpoint>",
        parse_checkpoint,
    )
    assert "twice" in str(err)


@pytest.mark.parametrize(
    ("doc", "what"),
    [
        ("<domainbackup><server name='localhost'/></domainbackup>", "pull"),
        (
            "<domainbackup mode='push'><disks><disk name='vda' exportname='x'/></disks>"
            "</domainbackup>",
            "exportname",
        ),
        ("<domainbackup mode='pull'><server transport='unix'/></domainbackup>", "socket"),
        ("<domainbackup mode='pull'><server transport='fd'/></domainbackup>", "fdgroup"),
        (
            "<domainbackup mode='pull'><server transport='unix' socket='/s' name='h'/>"
            "</domainbackup>",
            "name",
        ),
        ("<domainbackup mode='pull'><server transport='rdma' name='h'/></domainbackup>", "rdma"),
        ("<domainbackup mode='pull'><server name='h' port='70000'/></domainbackup>", "port"),
        ("<domainbackup mode='sideways'/>", "sideways"),
        (
            "<domainbackup><incremental>a</incremental><incremental>b</incremental></domainbackup>",
            "incremental",
        ),
    ],
)
def test_bad_backup_documents(doc: str, what: str) -> None:
    assert what in str(refused(doc, parse_backup))


@pytest.mark.parametrize(
    ("doc", "what"),
    [
        ("<domaincheckpoint><name>.hidden</name></domaincheckpoint>", "name"),
        ("<domaincheckpoint><name>a/b</name></domaincheckpoint>", "name"),
        (
            "<domaincheckpoint><disks><disk name='vda' checkpoint='no' bitmap='b'/></disks>"
            "</domaincheckpoint>",
            "bitmap",
        ),
        ("<domaincheckpoint><creationTime>-5</creationTime></domaincheckpoint>", "creationTime"),
        ("<domaincheckpoint><parent/></domaincheckpoint>", "parent"),
        ("<domaincheckpoint><active>1</active></domaincheckpoint>", "active"),
    ],
)
def test_bad_checkpoints(doc: str, what: str) -> None:
    assert what in str(refused(doc, parse_checkpoint))


def test_no_other_exception_escapes_a_fuzzed_corpus() -> None:
    """Every prefix and many one-byte corruptions of a rich document: XMLError or a spec."""
    doc = (
        b"<job type='backup'><uuid>6a1e2f3c-0000-4000-8000-000000000000</uuid><queue timeout='3'/>"
        b"<domainbackup mode='pull'><incremental>c0</incremental>"
        b"<server transport='tcp' tls='yes' name='localhost' port='10809'/><disks>"
        b"<disk name='vda' type='file' exportname='e'><driver type='qcow2'/>"
        b"<scratch file='/s'><seclabel model='dac' relabel='no'/><encryption format='luks'>"
        b"<secret type='passphrase' usage='u'/></encryption></scratch></disk></disks>"
        b"</domainbackup><domaincheckpoint><name>c1</name><disks><disk name='vda'/></disks>"
        b"</domaincheckpoint></job>"
    )
    parse_job(doc)
    variants = [doc[:i] for i in range(0, len(doc), 3)]
    for i in range(0, len(doc), 5):
        for byte in (b"\x00", b"<", b"'", b"&", b"9", b"\xff"):
            variants.append(doc[:i] + byte + doc[i + 1 :])
    for variant in variants:
        with contextlib.suppress(XMLError):
            parse_job(variant)


# ---- only bad input is an XMLError; a bug stays a bug (issue 8, item 20) ---------------

BUGGY = JobType("test-buggy")


@frozen
class BuggySpec:
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()

    TYPE: ClassVar[JobType] = BUGGY


class BuggyCodec:
    """A codec with a bug: which exception it raises is set by the test."""

    schema = "<define name='job-test-buggy'><empty/></define>"
    error: BaseException = AttributeError("'NoneType' object has no attribute 'text'")

    def parse(self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions) -> Any:
        raise self.error

    def format(self, spec: Any, job: etree._Element) -> None:
        raise self.error


@pytest.fixture
def buggy() -> Iterator[BuggyCodec]:
    codec = BuggyCodec()
    registry.register(
        JobTypeInfo(BUGGY, BuggySpec, codec, lambda spec, dom: (), False, 0), replace=True
    )
    yield codec


@pytest.mark.parametrize(
    "error",
    [
        AttributeError("'NoneType' object has no attribute 'text'"),
        AssertionError("unreachable"),
        MemoryError(),
        TypeError("unsupported operand"),
        KeyError("x"),
        RecursionError("too deep"),
    ],
)
def test_a_bug_in_a_parser_is_not_reported_as_bad_input(
    buggy: BuggyCodec, error: BaseException
) -> None:
    buggy.error = error
    with pytest.raises(type(error)):
        parse_job("<job type='test-buggy'/>")
    with pytest.raises(type(error)):
        format_job(BuggySpec())


def test_bad_values_in_a_codec_still_are_bad_input(buggy: BuggyCodec) -> None:
    buggy.error = ValueError("invalid literal for int() with base 10: 'x'")
    assert "invalid literal" in str(refused("<job type='test-buggy'/>"))


def test_enumerated_attributes_are_taken_as_written() -> None:
    """The grammar's token values also match ' file ' (whitespace is collapsed); the
    parsers once looked that up as written and raised KeyError, which the wrapper hid."""
    cases: list[tuple[Parser, str, str]] = [
        (
            parse_backup,
            "<domainbackup><disks><disk name='vda' type='file '/></disks></domainbackup>",
            "<disk name='vda'> attribute 'type': 'file ' is not one of 'file', 'block' (line 1)",
        ),
        (
            parse_backup,
            "<domainbackup><disks><disk name='vda' backup='no '/></disks></domainbackup>",
            "<disk name='vda'> attribute 'backup': 'no ' is not one of 'yes', 'no' (line 1)",
        ),
        (
            parse_backup,
            "<domainbackup><disks><disk name='vda' backupmode=' full'/></disks></domainbackup>",
            "<disk name='vda'> attribute 'backupmode': ' full' is not one of 'full', "
            "'incremental' (line 1)",
        ),
        (
            parse_backup,
            "<domainbackup mode='pull '/>",
            "<domainbackup> attribute 'mode': 'pull ' is not one of 'push', 'pull' (line 1)",
        ),
        (
            parse_backup,
            "<domainbackup mode='pull'><server transport='unix ' socket='/s'/></domainbackup>",
            "<server> attribute 'transport': 'unix ' is not one of 'tcp', 'unix', 'fd' (line 1)",
        ),
        (
            parse_backup,
            "<domainbackup mode='pull'><server tls='yes ' name='h'/></domainbackup>",
            "<server name='h'> attribute 'tls': 'yes ' is not one of 'yes', 'no' (line 1)",
        ),
        (
            parse_checkpoint,
            "<domaincheckpoint><disks><disk name='vda' checkpoint='no '/></disks>"
            "</domaincheckpoint>",
            "<disk name='vda'> attribute 'checkpoint': 'no ' is not one of 'bitmap', 'no' (line 1)",
        ),
        (
            parse_job,
            "<job type='blockpull'><disk name='vda'/><bandwidth unit='MiB/s '>1</bandwidth></job>",
            "<bandwidth> attribute 'unit': 'MiB/s ' is not one of 'bytes/s', 'B/s', 'KiB/s', "
            "'MiB/s', 'GiB/s' (line 1)",
        ),
    ]
    for parser, doc, message in cases:
        assert str(refused(doc, parser)) == message


def _mutants(doc: bytes, rnd: random.Random, count: int) -> Iterator[bytes]:
    tokens = [b"\x00", b"<", b"'", b"&", b"9", b"\xff", b"-", b"0", b" ", b"a", b"=", b">"]
    tokens += [b"99999999999999999999999", b"'x'", b"yes", b"no", b"-1", b"1e999", b"nan"]
    tokens += [b"</disk>", b"<disk name='vdc'/>", b" type='block'", b" "]
    for _ in range(count):
        d = bytearray(doc)
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(len(d) + 1)
            d[i : i + rnd.randint(0, 3)] = rnd.choice(tokens)
        yield bytes(d)


#: mutants per document (JOBCORE_FUZZ_MUTANTS=20000 for a long run: ~740,000 documents)
FUZZ_MUTANTS = int(os.environ.get("JOBCORE_FUZZ_MUTANTS", "150"))


def test_mutants_of_the_corpus_and_the_job_types_parse_or_say_why() -> None:
    """Random corruptions of every corpus document and of a rich job of each built-in
    type: an XMLError, or a spec that formats and parses back to itself. Nothing else."""
    docs: list[tuple[Parser, Callable[[Any], str], bytes]] = []
    for path in sorted(CORPUS.rglob("*.xml")):
        text = path.read_bytes()
        if b"<domainbackup" in text[:200]:
            docs.append((parse_backup, format_backup, text))
        elif b"<domaincheckpoint" in text[:200]:
            docs.append((parse_checkpoint, format_checkpoint, text))
    assert len(docs) > 20, "the libvirt corpus is missing"
    docs += [(parse_job, format_job, job) for job in RICH_JOBS]
    rnd = random.Random(8)
    for parse, fmt, doc in docs:
        for mutant in _mutants(doc, rnd, FUZZ_MUTANTS):
            try:
                spec = parse(mutant)
            except XMLError:
                continue
            assert parse(fmt(spec)) == spec, mutant


RICH_JOBS = [
    b"<job type='blockpull'><uuid>6a1e2f3c-0000-4000-8000-000000000000</uuid>"
    b"<queue timeout='3'/><priority>5</priority><retention seconds='10'/><disk name='vda'/>"
    b"<base index='2'/><top file='/a/b'/><bandwidth unit='MiB/s'>100</bandwidth></job>",
    b"<job type='blockcommit'><disk name='vda'/><top index='0'/><base index='2'/><pivot/>"
    b"<delete/><shallow/><bandwidth unit='MiB/s'>100</bandwidth></job>",
    b"<job type='migration'><destination uri='sim:///other'/><bandwidth unit='MiB/s'>1000"
    b"</bandwidth><downtime-limit unit='ms'>300</downtime-limit></job>",
    b"<job type='backup'><domainbackup mode='pull'><incremental>c0</incremental>"
    b"<server transport='tcp' tls='yes' name='localhost' port='10809'/><disks>"
    b"<disk name='vda' type='file' exportname='e' exportbitmap='b'><driver type='qcow2'/>"
    b"<scratch file='/s'><seclabel model='dac' relabel='no'/><encryption format='luks'>"
    b"<secret type='passphrase' usage='u'/></encryption></scratch></disk>"
    b"<disk name='vdb' type='block' backup='no'/></disks></domainbackup><domaincheckpoint>"
    b"<name>c1</name><description>d</description><disks><disk name='vda' "
    b"checkpoint='bitmap' bitmap='x'/></disks></domaincheckpoint></job>",
]


# ---- error texts say what and where, once (issue 8, item 28) ---------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            "<job",
            "<job> document is not well-formed XML: Couldn't find end of Start Tag job line 1, "
            "at column 5 (line 1)",
        ),
        (
            "not xml",
            "<job> document is not well-formed XML: Start tag expected, '<' not found, "
            "at column 1 (line 1)",
        ),
        ("", "<job> document is not well-formed XML: Document is empty, at column 1 (line 1)"),
        (
            "<job type='blockpull'>\n\n<disk name='vda'>\n</job>",
            "<job> document is not well-formed XML: Opening and ending tag mismatch: disk line 3 "
            "and job, at column 7 (line 4)",
        ),
        (
            "<job type='blockpull'><disk name='vda'/>\n<bandwidth unit='MB/s'>1</bandwidth></job>",
            "invalid <job> document at /job/bandwidth: Invalid attribute unit for element "
            "bandwidth (value 'MB/s'; allowed: 'bytes/s', 'B/s', 'KiB/s', 'MiB/s', 'GiB/s') "
            "(line 2)",
        ),
        (
            "<job type='migration'><destination uri='sim:///x'/>"
            "<downtime-limit unit='min'>1</downtime-limit></job>",
            "invalid <job> document at /job/downtime-limit: Invalid attribute unit for element "
            "downtime-limit (value 'min'; allowed: 'ms', 's') (line 1)",
        ),
        (
            "<job type='backup'><domainbackup mode='sideways'/></job>",
            "invalid <job> document at /job/domainbackup: Invalid attribute mode for element "
            "domainbackup (value 'sideways'; allowed: 'push', 'pull') (line 1)",
        ),
    ],
)
def test_error_messages(doc: str, message: str) -> None:
    assert str(refused(doc)) == message
