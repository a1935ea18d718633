"""The parsers' lean paths (design/xml.md "Performance") give what the documents say.

The parsers walk children without a tag filter (a comment or processing instruction must
match no branch), look enumerations up in tables, check datatypes with bare matchers and
refuse a repeated child themselves; the compiled grammar tries common values first.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from lxml import etree
from test_xml_roundtrip import backups, checkpoints, job_specs

from jobcore.backup import BackupDisk, BackupStore, StoreType
from jobcore.errors import XMLError
from jobcore.registry import registry
from jobcore.xml import format_backup, format_checkpoint, format_job, parse_job
from jobcore.xml._parse import parse_document, trusted, validate
from jobcore.xml._schema import RNG_NS, module_defines
from jobcore.xml.documents import parse_backup, parse_checkpoint
from jobcore.xml.job import job_schema

#: a checkpoint's <domain> is kept as written: a comment there is content
_KEPT = {"domain"}


def _with_comments(doc: str) -> str:
    """``doc`` with a comment and a processing instruction at the start and end of every
    element but those that hold text (outside a checkpoint's kept ``<domain>``)."""
    root = etree.fromstring(doc.encode())

    def visit(el: etree._Element) -> None:
        if el.tag in _KEPT or (len(el) == 0 and el.text is not None):
            return  # text, even blank, is content
        for child in list(el):
            visit(child)
        el.insert(0, etree.Comment(" c "))
        el.append(etree.ProcessingInstruction("pi", "x"))

    visit(root)
    return etree.tostring(root, encoding="unicode")


@given(job_specs)
def test_comments_and_instructions_between_children_change_no_job(spec: Any) -> None:
    doc = format_job(spec)
    assert parse_job(_with_comments(doc)) == parse_job(doc) == spec


@given(backups())
def test_comments_and_instructions_change_no_backup(defn: Any) -> None:
    doc = format_backup(defn)
    assert parse_backup(_with_comments(doc)) == parse_backup(doc)


@given(checkpoints)
def test_comments_and_instructions_change_no_checkpoint(defn: Any) -> None:
    doc = format_checkpoint(defn)
    assert parse_checkpoint(_with_comments(doc)) == parse_checkpoint(doc)


def test_a_comment_in_a_checkpoint_parent_is_not_its_name() -> None:
    # before: the first child of <parent>, the comment, was read as the parent's name
    doc = "<domaincheckpoint><parent><!--x--><name>a</name></parent></domaincheckpoint>"
    assert parse_checkpoint(doc).parent == "a"


BACKUP = (
    "<job type='backup'>\n<domainbackup mode='pull'>\n<disks>\n"
    "<disk name='vda'>{disk}</disk>\n</disks>\n</domainbackup>\n</job>"
)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            BACKUP.format(disk="<driver type='qcow2'/><driver type='qcow2'/>"),
            "<driver>: <driver> may appear only once here (line 4)",
        ),
        (
            BACKUP.format(disk="<scratch file='/a'/><scratch file='/b'/>"),
            "<scratch>: <scratch> may appear only once here (line 4)",
        ),
        (
            BACKUP.format(disk="<target file='/a'/>"),
            "<target>: a pull mode backup writes to <scratch>, not <target> (line 4)",
        ),
        (
            "<job type='backup'>\n<domainbackup><disks><disk name='vda'/></disks>\n"
            "<disks><disk name='vdb'/></disks></domainbackup></job>",
            "<disks>: <disks> may appear only once here (line 3)",
        ),
        (
            "<job type='backup'>\n<domainbackup/>\n<domainbackup/></job>",
            "<domainbackup>: <domainbackup> may appear only once here (line 3)",
        ),
        (
            "<job type='backup'><domaincheckpoint>\n<name>a</name>\n<name>b</name>"
            "</domaincheckpoint></job>",
            "<name>: <name> may appear only once here (line 3)",
        ),
        (
            "<job type='blockpull'>\n<disk name='vda'/>\n<disk name='vdb'/></job>",
            "<disk name='vdb'>: <disk> may appear only once here (line 3)",
        ),
        (
            "<job type='blockcommit'>\n<disk name='vda'/><pivot/>\n<pivot/></job>",
            "<pivot>: <pivot> may appear only once here (line 3)",
        ),
        (
            "<job type='migration'>\n<destination uri='sim:///x'/>\n<live/>\n<live/></job>",
            "<live>: <live> may appear only once here (line 4)",
        ),
        (
            "<job type='migration'>\n<uuid>0b3c3a52-6d4e-4a8f-9b1c-2f6f8e0d4a17</uuid>\n"
            "<destination uri='sim:///x'/>\n<uuid>0b3c3a52-6d4e-4a8f-9b1c-2f6f8e0d4a17</uuid>"
            "</job>",
            "<uuid>: <uuid> may appear only once here (line 4)",
        ),
        (
            BACKUP.format(disk="<driver type='qcow2'/><scratch file='relative'/>"),
            "<scratch> attribute 'file': 'relative' is not a valid absolute path (line 4)",
        ),
        (
            "<job type='backup'><domainbackup mode='pull'>\n<disks><disk name='vda' "
            "type='block'><scratch file='/a'/></disk></disks></domainbackup></job>",
            "<scratch> attribute 'file': a disk of type 'block' names its scratch with 'dev' "
            "(line 2)",
        ),
        (
            "<job type='backup'><domainbackup>\n<disks><disk name='vda' backup='no '/>"
            "</disks></domainbackup></job>",
            "<disk name='vda'> attribute 'backup': 'no ' is not one of 'yes', 'no' (line 2)",
        ),
        (
            "<job type='backup'><domaincheckpoint>\n<disks><disk name='vda' "
            "checkpoint='no ' /></disks></domaincheckpoint></job>",
            "<disk name='vda'> attribute 'checkpoint': 'no ' is not one of 'bitmap', 'no' (line 2)",
        ),
    ],
)
def test_a_lean_path_refuses_as_the_checking_functions_do(doc: str, message: str) -> None:
    with pytest.raises(XMLError) as caught:
        parse_job(doc)
    assert str(caught.value) == message


def _formats() -> list[str]:
    define = next(d for d in module_defines("types.rng") if d.get("name") == "storageFormat")
    return [(v.text or "").strip() for v in define.iter(f"{{{RNG_NS}}}value")]


def _driver_job(fmt: str) -> etree._Element:
    return parse_document(
        "<job type='backup'><domainbackup mode='push'><disks><disk name='vda'>"
        f"<driver type='{fmt}'/></disk></disks></domainbackup></job>",
        "job",
    )


def test_common_values_first_accept_and_refuse_the_same_values() -> None:
    schema = job_schema(registry.get("backup"))
    formats = _formats()
    for fmt in formats:
        validate(schema, _driver_job(fmt), "job")  # every format of types.rng, as written
    for bad in ("qcow3", "QCOW2", "", "qcow2 raw"):
        with pytest.raises(XMLError, match="driver failed to validate attributes"):
            validate(schema, _driver_job(bad), "job")
    # messages list the allowed values in the grammar's own order
    assert schema.allowed_values("driver", "type") == tuple(formats)


def _rebuilt(value: Any) -> Any:
    """``value`` rebuilt through its classes' ``__init__`` (converters, validators and
    ``__attrs_post_init__`` run), bottom up."""
    cls = type(value)
    if attrs.has(cls):
        fields = attrs.fields(cls)
        return cls(**{f.alias: _rebuilt(getattr(value, f.name)) for f in fields if f.init})
    if isinstance(value, tuple):
        return tuple(_rebuilt(v) for v in value)
    return value


def _assert_built_by_their_classes(parsed: Any, source: Any) -> None:
    """``parsed`` is ``source`` (field types too) and what its classes' __init__ build."""
    rebuilt = _rebuilt(parsed)
    assert rebuilt == parsed == source
    # repr tells a StrEnum from its string and a tuple from a list, which == does not
    assert repr(rebuilt) == repr(parsed) == repr(source)
    assert hash(rebuilt) == hash(parsed)


@given(job_specs)
def test_parsed_jobs_are_what_their_classes_build(spec: Any) -> None:
    # the parsers build values without attrs' __init__ (jobcore.xml._parse.trusted)
    _assert_built_by_their_classes(parse_job(format_job(spec)), spec)


@given(backups())
def test_parsed_backups_are_what_their_classes_build(defn: Any) -> None:
    _assert_built_by_their_classes(parse_backup(format_backup(defn)), defn)


@given(checkpoints)
def test_parsed_checkpoints_are_what_their_classes_build(defn: Any) -> None:
    _assert_built_by_their_classes(parse_checkpoint(format_checkpoint(defn)), defn)


def test_trusted_stores_the_fields_as_given() -> None:
    make = trusted(BackupDisk)
    store = BackupStore("/b/vda.qcow2", "qcow2")
    made = make("vda", True, StoreType.FILE, None, None, "e", None, store, None, 3)
    assert made == BackupDisk("vda", True, StoreType.FILE, exportname="e", store=store, index=3)
    assert repr(made) == repr(
        BackupDisk("vda", True, StoreType.FILE, None, None, "e", None, store, None, 3)
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.name = "vdb"  # type: ignore[misc]
    with pytest.raises(TypeError):
        make("vda")  # every field, positionally
