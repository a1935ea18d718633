"""libvirt's own test data for <domainbackup> and <domaincheckpoint> (../shared/corpus).

The corpus must be there: a missing corpus fails these tests, it never skips them.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from lxml import etree

from jobcore.backup import CheckpointDef, CheckpointDisk, CheckpointKind
from jobcore.errors import InvalidArgument, XMLError
from jobcore.xml import (
    align_backup,
    format_backup,
    format_checkpoint,
    parse_backup,
    parse_checkpoint,
)

CORPUS = Path(__file__).parents[1] / ".." / "shared" / "corpus"
LIBVIRT = CORPUS / "libvirt"
BACKUP_IN = LIBVIRT / "domainbackupxml2xmlin"
BACKUP_OUT = LIBVIRT / "domainbackupxml2xmlout"
CHECKPOINT_IN = LIBVIRT / "qemudomaincheckpointxml2xmlin"
CHECKPOINT_OUT = LIBVIRT / "qemudomaincheckpointxml2xmlout"
SCHEMAS = LIBVIRT / "schemas"


def _names(folder: Path) -> list[str]:
    assert folder.is_dir(), f"libvirt corpus missing: {folder.resolve()}"
    return sorted(p.name for p in folder.glob("*.xml"))


def test_corpus_is_complete() -> None:
    assert len(_names(BACKUP_IN)) == 10
    assert _names(BACKUP_OUT) == _names(BACKUP_IN)
    assert len(_names(CHECKPOINT_IN)) == 6
    assert len(_names(CHECKPOINT_OUT)) == 7


BACKUP_CASES = [
    "backup-pull-encrypted.xml",
    "backup-pull-fd.xml",
    "backup-pull-seclabel.xml",
    "backup-pull-unix.xml",
    "backup-pull.xml",
    "backup-push-encrypted.xml",
    "backup-push-seclabel.xml",
    "backup-push.xml",
    "empty.xml",
]


def _libvirt_schema(name: str) -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMAS / name)))


@pytest.fixture(scope="module")
def backup_rng() -> etree.RelaxNG:
    return _libvirt_schema("domainbackup.rng")


@pytest.fixture(scope="module")
def checkpoint_rng() -> etree.RelaxNG:
    return _libvirt_schema("domaincheckpoint.rng")


def _fake_domain(names: list[str]) -> dict[str, str]:
    """libvirt's genericxml2xmltest domain: every disk the input names, then vdextradisk,
    each with source /fake/NAME.qcow2."""
    disks = {name: f"/fake/{name}.qcow2" for name in names}
    disks["vdextradisk"] = "/fake/vdextradisk.qcow2"
    return disks


def test_backup_cases_cover_the_corpus() -> None:
    valid = [n for n in _names(BACKUP_IN) if "-invalid" not in n]
    assert sorted(BACKUP_CASES) == valid


@pytest.mark.parametrize("name", BACKUP_CASES)
def test_backup_pair(name: str, backup_rng: etree.RelaxNG) -> None:
    parsed = parse_backup((BACKUP_IN / name).read_bytes())
    aligned = align_backup(parsed, _fake_domain([d.name for d in parsed.disks]), "SUFFIX")
    out = format_backup(aligned)
    assert out == (BACKUP_OUT / name).read_text()
    # the output reads back as itself
    assert parse_backup(out) == aligned
    assert format_backup(parse_backup(out)) == out
    if name != "backup-pull-fd.xml":  # libvirt 9.0's schema predates transport='fd'
        doc = etree.fromstring(out.encode())
        assert backup_rng.validate(doc), backup_rng.error_log


@pytest.mark.parametrize("name", _names(BACKUP_IN) if BACKUP_IN.is_dir() else ["missing"])
def test_backup_str_and_bytes_agree(name: str) -> None:
    path = BACKUP_IN / name
    if "-invalid" in name:
        return
    assert parse_backup(path.read_text()) == parse_backup(path.read_bytes())


@pytest.mark.parametrize("folder", [BACKUP_IN, BACKUP_OUT])
def test_backup_internal_documents_are_rejected(folder: Path) -> None:
    invalid = [n for n in _names(folder) if "-invalid" in n]
    assert invalid == ["backup-pull-internal-invalid.xml"]
    with pytest.raises(XMLError) as err:
        parse_backup((folder / invalid[0]).read_bytes())
    assert "state" in str(err.value) and err.value.line == 5


def test_backup_fd_is_libvirt_11_3_format() -> None:
    parsed = parse_backup((BACKUP_IN / "backup-pull-fd.xml").read_bytes())
    assert parsed.server is not None and parsed.server.fdgroup == "nbdfd"
    assert str(parsed.server.transport) == "fd"


# --- checkpoints ---------------------------------------------------------------------

#: how libvirt's qemudomaincheckpointxml2xmltest creates each input: its mocked creation
#: time, whether a parent is set, whether vda's size is reported
CREATE = {
    "empty.xml": (1525889631, None, None),
    "disk-default.xml": (1525889631, "1525111885", None),
    "sample.xml": (1525889631, "1525111885", None),
    "size.xml": (1553648510, "1525111885", 1048576),
}


def _libvirt_test_create(
    defn: CheckpointDef, now: int, parent: str | None, size: int | None
) -> CheckpointDef:
    """What that test does after parsing (it is mocked, not something parse can know):
    default name = creation time, the mocked time and parent, and disk vda checkpointed
    into a bitmap named after the checkpoint."""
    name = defn.name or str(now)
    disks = list(defn.disks) or [CheckpointDisk(name="vda")]
    disks = [
        attrs.evolve(d, checkpoint=CheckpointKind.BITMAP, bitmap=d.bitmap or name)
        if d.checkpoint is not CheckpointKind.NO
        else d
        for d in disks
    ]
    if size is not None:
        disks[0] = attrs.evolve(disks[0], size=size)
    return attrs.evolve(defn, name=name, creation_time=now, parent=parent, disks=disks)


def test_checkpoint_cases_cover_the_corpus() -> None:
    valid = [n for n in _names(CHECKPOINT_IN) if "-invalid" not in n]
    assert sorted(CREATE) == valid


@pytest.mark.parametrize("name", sorted(CREATE))
def test_checkpoint_input(name: str, checkpoint_rng: etree.RelaxNG) -> None:
    text = (CHECKPOINT_IN / name).read_text()
    parsed = parse_checkpoint(text)
    once = format_checkpoint(parsed)
    # stable, accepted by libvirt's schema, and reads back as the same definition
    assert format_checkpoint(parse_checkpoint(once)) == once
    assert parse_checkpoint(once) == parsed
    assert checkpoint_rng.validate(etree.fromstring(once.encode())), checkpoint_rng.error_log
    created = _libvirt_test_create(parsed, *CREATE[name])
    assert format_checkpoint(created) == (CHECKPOINT_OUT / name).read_text()


def test_checkpoint_input_is_kept_as_written() -> None:
    parsed = parse_checkpoint((CHECKPOINT_IN / "sample.xml").read_bytes())
    assert parsed == CheckpointDef(
        description="Completion of updates after OS install",
        disks=(
            CheckpointDisk("vda", checkpoint=CheckpointKind.BITMAP),
            CheckpointDisk("vdb", checkpoint=CheckpointKind.NO),
        ),
    )
    default = parse_checkpoint((CHECKPOINT_IN / "disk-default.xml").read_bytes())
    assert default.disks == (CheckpointDisk("vda"),)  # the comment is not a disk


@pytest.mark.parametrize(
    ("name", "line", "what"),
    [("disk-invalid.xml", 6, "disk"), ("name-invalid.xml", 3, "../escape")],
)
def test_checkpoint_invalid_inputs_are_rejected(name: str, line: int, what: str) -> None:
    with pytest.raises(XMLError) as err:
        parse_checkpoint((CHECKPOINT_IN / name).read_bytes())
    assert err.value.line == line
    assert what in str(err.value)


REDEFINE = ["disk-default.xml", "empty.xml", "redefine.xml", "sample.xml", "size.xml"]


@pytest.mark.parametrize("name", REDEFINE)
def test_checkpoint_output_redefines_byte_for_byte(
    name: str, checkpoint_rng: etree.RelaxNG
) -> None:
    text = (CHECKPOINT_OUT / name).read_text()
    parsed = parse_checkpoint(text)
    assert format_checkpoint(parsed) == text
    assert parse_checkpoint(text.encode()) == parsed
    assert checkpoint_rng.validate(etree.fromstring(text.encode()))


def test_redefinition_keeps_the_domain_verbatim() -> None:
    parsed = parse_checkpoint((CHECKPOINT_OUT / "redefine.xml").read_bytes())
    assert parsed.name == "c1" and parsed.creation_time == 1553647812
    assert parsed.domain is not None
    assert parsed.domain.startswith("<domain type='qemu'>\n  <name>QEMUGuest1</name>\n")
    assert parsed.domain.endswith("\n</domain>")
    assert "<readonly/>" in parsed.domain and "<audio id='1' type='none'/>" in parsed.domain


@pytest.mark.parametrize("name", ["internal-active-invalid.xml", "internal-inactive-invalid.xml"])
def test_checkpoint_internal_outputs_are_rejected(name: str) -> None:
    with pytest.raises(XMLError) as err:
        parse_checkpoint((CHECKPOINT_OUT / name).read_bytes())
    assert "active" in str(err.value) and err.value.line == 52


def test_checkpoint_outputs_cover_the_corpus() -> None:
    names = _names(CHECKPOINT_OUT)
    assert sorted([*REDEFINE, "internal-active-invalid.xml", "internal-inactive-invalid.xml"]) == (
        names
    )


def test_kept_domain_is_laid_out_like_libvirt() -> None:
    doc = (
        "<domaincheckpoint><name>c1</name>\n"
        "\t<domain type='kvm' xmlns:q='urn:q'><name>a&apos;b</name><!-- note -->"
        "<description>mixed <b>bold</b> text</description>"
        "<q:extra q:attr='1'/></domain></domaincheckpoint>"
    )
    parsed = parse_checkpoint(doc)
    assert parsed.domain == (
        "<domain xmlns:q='urn:q' type='kvm'>\n"
        "  <name>a&apos;b</name>\n"
        "  <!-- note -->\n"
        "  <description>mixed <b>bold</b> text</description>\n"
        "  <q:extra q:attr='1'/>\n"
        "</domain>"
    )
    out = format_checkpoint(parsed)
    assert "\n  <domain xmlns:q='urn:q' type='kvm'>\n    <name>" in out
    assert parse_checkpoint(out) == parsed


def test_align_refuses_what_the_domain_does_not_have() -> None:
    backup = parse_backup(
        "<domainbackup><disks><disk name='vdz' type='file'/></disks></domainbackup>"
    )
    with pytest.raises(InvalidArgument, match="vdz"):
        align_backup(backup, {"vda": "/i/vda.qcow2"}, "S")
    with pytest.raises(InvalidArgument, match="at least one disk"):
        align_backup(parse_backup("<domainbackup/>"), {}, "S")
    block = parse_backup(
        "<domainbackup><disks><disk name='vda' type='block'/></disks></domainbackup>"
    )
    with pytest.raises(InvalidArgument, match="block"):
        align_backup(block, {"vda": "/dev/sda"}, "S")


def test_align_order_and_defaults() -> None:
    backup = parse_backup(
        "<domainbackup><incremental>c0</incremental><disks>"
        "<disk name='vdc' type='file'><driver type='raw'/></disk>"
        "<disk name='vda' backup='no'/></disks></domainbackup>"
    )
    aligned = align_backup(backup, {"vda": "/i/a", "vdb": "/i/b", "vdc": "/i/c"}, "chk1")
    assert [(d.name, d.backup) for d in aligned.disks] == [
        ("vdc", True),
        ("vda", False),
        ("vdb", False),
    ]
    vdc = aligned.disks[0]
    assert vdc.store is not None and vdc.store.path == "/i/c.chk1" and vdc.store.format == "raw"
    assert vdc.backupmode is not None and vdc.incremental == "c0" and vdc.driver is None
