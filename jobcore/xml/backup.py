"""libvirt's ``<domainbackup>``: element <-> BackupDef, and virDomainBackupAlignDisks.

The parser keeps what the document says (``None`` = not written); ``align_backup`` fills
libvirt's defaults against a domain. The formatter writes attributes and children in
libvirt's order, so an aligned definition formats as libvirt formats it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import attrs
from lxml import etree

from jobcore.backup import (
    BackupDef,
    BackupDisk,
    BackupMode,
    BackupServer,
    BackupStore,
    DiskBackupMode,
    Encryption,
    EncryptionCipher,
    EncryptionFormat,
    EncryptionIvgen,
    EncryptionSecret,
    SecLabel,
    ServerTransport,
    StoreType,
)
from jobcore.errors import InvalidArgument, XMLError
from jobcore.spec import evolved
from jobcore.xml import _types as T
from jobcore.xml._parse import attr_choice, fail, once, repeated, trusted
from jobcore.xml._types import abs_path, disk_dev, host_name

_YES_NO = {"yes": True, "no": False}
_ELEMENT = etree.Element  # tag filter: elements only, no comments


def _text(el: etree._Element) -> str | None:
    """Element text as libvirt reads it: an empty element is absent."""
    return el.text or None


# --- parse ---------------------------------------------------------------------------
#
# These parsers run on every job begun, so their happy path is lean: children are walked
# once without a tag filter (comments and processing instructions, whose tag is not a
# string, match no branch), attributes read once, enumerations looked up in their tables
# and datatypes checked with the bare matchers of jobcore.xml._types. A value that fails
# goes through the checking function (``choice``, ``T.check``), which raises the error.


def parse_backup_element(el: etree._Element) -> BackupDef:
    """A schema-valid ``<domainbackup>`` element -> BackupDef, with libvirt's semantic
    checks (which the schema cannot express) reported at the offending element."""
    mode = attr_choice(el, b"mode", _MODES)
    pull = mode is BackupMode.PULL
    incremental: str | None = None
    server: BackupServer | None = None
    disks: tuple[BackupDisk, ...] = ()
    #: the first disk whose incremental backup needs the top-level <incremental>
    needs_incremental: etree._Element | None = None
    seen_disks = seen_incremental = seen_server = False
    # the grammar admits these three children (and comments, whose tag is no string)
    for child in el:
        tag = child.tag
        if tag == "disks":
            if seen_disks:
                repeated(child)
            seen_disks = True
            disks, needs_incremental = _parse_disks(child, pull)
        elif tag == "incremental":
            if seen_incremental:
                repeated(child)
            seen_incremental = True
            incremental = _text(child)
        elif tag == "server":
            if seen_server:
                repeated(child)
            seen_server = True
            if not pull:
                fail(child, "use of <server> requires pull mode backup")
            server = _parse_server(child)
    if incremental is None and needs_incremental is not None:
        fail(
            needs_incremental,
            "backupmode='incremental' needs a checkpoint: set the disk's "
            "'incremental' attribute or the backup's <incremental>",
            "backupmode",
        )
    return _new_def(mode, incremental, server, disks)


def _parse_disks(
    el: etree._Element, pull: bool
) -> tuple[tuple[BackupDisk, ...], etree._Element | None]:
    """The ``<disk>``s of ``<disks>`` (a name twice is refused where it is met), and the
    first whose incremental backup names no checkpoint."""
    names: set[str] = set()
    disks: list[BackupDisk] = []
    needs_incremental: etree._Element | None = None
    for disk_el in el:
        if disk_el.tag != "disk":
            continue  # a comment (the grammar admits no other child)
        disk = _parse_disk(disk_el, pull)
        name = disk.name
        if name in names:
            fail(disk_el, f"disk '{name}' is named twice")
        names.add(name)
        disks.append(disk)
        if (
            needs_incremental is None
            and disk.backupmode is DiskBackupMode.INCREMENTAL
            and disk.incremental is None
        ):
            needs_incremental = disk_el
    return tuple(disks), needs_incremental


#: the attribute a server of each transport needs
_NEEDS = {
    ServerTransport.TCP: "name",
    ServerTransport.UNIX: "socket",
    ServerTransport.FD: "fdgroup",
}


def _parse_server(el: etree._Element) -> BackupServer:
    get = el.get
    transport = attr_choice(el, b"transport", _TRANSPORTS)
    kind = transport or ServerTransport.TCP
    needs = _NEEDS[kind]
    name = get(b"name")
    port_attr = get(b"port")
    socket = get(b"socket")
    fdgroup = get(b"fdgroup")
    if kind is ServerTransport.TCP and name is not None and socket is None and fdgroup is None:
        pass  # the common server: a host name and maybe a port
    else:
        if get(needs) is None:
            fail(el, f"transport '{kind}' needs attribute '{needs}'")
        for other, written in (
            ("name", name),
            ("port", port_attr),
            ("socket", socket),
            ("fdgroup", fdgroup),
        ):
            if (
                written is not None
                and other != needs
                and not (other == "port" and kind is ServerTransport.TCP)
            ):
                fail(el, f"not allowed with transport '{kind}'", other)
    port = None
    if port_attr is not None:
        port = int(port_attr)
        if not 0 < port < 65536:
            fail(el, f"port {port} is out of range 1..65535", "port")
    tls = attr_choice(el, b"tls", _YES_NO)
    if name is not None and host_name(name) is None:
        T.check(el, "name", name, "hostName")
    if socket is not None and abs_path(socket) is None:
        T.check(el, "socket", socket, "absFilePath")
    if fdgroup == "":
        T.check(el, "fdgroup", fdgroup, "nonEmpty")
    return _new_server(transport, name, port, socket, fdgroup, tls)


_STORE_TYPES = {t.value: t for t in StoreType}
_DISK_MODES = {m.value: m for m in DiskBackupMode}
_MODES = {m.value: m for m in BackupMode}
_TRANSPORTS = {t.value: t for t in ServerTransport}
_FILE, _BLOCK = StoreType.FILE, StoreType.BLOCK
_FULL = DiskBackupMode.FULL

# The values the parsers build, made without attrs' __init__: each value has passed the
# checks of the class's __attrs_post_init__ (a disk with a store has no driver; a disk
# with backup='no' is returned before any other setting is read) and its converters'
# tuples are passed as tuples.
_new_def = trusted(BackupDef)
_new_disk = trusted(BackupDisk)
_new_store = trusted(BackupStore)
_new_server = trusted(BackupServer)


def _parse_disk(el: etree._Element, pull: bool) -> BackupDisk:
    get = el.get
    name = get(b"name", "")
    if disk_dev(name) is None:
        T.check(el, "name", name, "diskTargetDev")
    included = attr_choice(el, b"backup", _YES_NO)
    if included is False:  # libvirt ignores every other setting of an excluded disk
        return _new_disk(name, False, None, None, None, None, None, None, None, None)
    exportname = get(b"exportname")
    exportbitmap = get(b"exportbitmap")
    if not pull:
        for attr, written in (("exportname", exportname), ("exportbitmap", exportbitmap)):
            if written is not None:
                fail(el, "only a pull mode backup exports disks", attr)
    store_type = attr_choice(el, b"type", _STORE_TYPES)
    backupmode = attr_choice(el, b"backupmode", _DISK_MODES)
    incremental = get(b"incremental")
    if incremental is not None:
        if not incremental:
            T.check(el, "incremental", incremental, "nonEmpty")
        if backupmode is _FULL:
            fail(el, "a disk with backupmode='full' takes no checkpoint", "incremental")
    index_attr = get(b"index")
    driver: str | None = None
    store = None
    if len(el):
        store_el: etree._Element | None = None
        driver_el: etree._Element | None = None
        want = "scratch" if pull else "target"
        for child in el:
            tag = child.tag
            if tag == "driver":
                if driver_el is not None:
                    repeated(child)
                driver_el = child
                driver = child.get(b"type")
                if pull and driver != "qcow2":
                    fail(child, f"pull mode backup for disk '{name}' requires qcow2 driver", "type")
            elif tag == want:
                if store_el is not None:
                    repeated(child)
                store_el = child
            elif isinstance(tag, str):  # not a comment
                mode_name = "pull" if pull else "push"
                fail(child, f"a {mode_name} mode backup writes to <{want}>, not <{tag}>")
        if store_el is not None:
            if store_type is _BLOCK:
                path = store_el.get(b"dev")
                if path is None or abs_path(path) is None or len(store_el):
                    store = _parse_store(store_el, store_type, driver)
                else:
                    store = _new_store(path, driver, (), None)
            else:
                path = store_el.get(b"file")
                if path is None or abs_path(path) is None or len(store_el):
                    store = _parse_store(store_el, _FILE, driver)
                else:
                    store = _new_store(path, driver, (), None)
            driver = None
    if exportname == "":
        T.check(el, "exportname", exportname, "nonEmpty")
    if exportbitmap == "":
        T.check(el, "exportbitmap", exportbitmap, "nonEmpty")
    try:
        index = None if index_attr is None else int(index_attr)
    except ValueError as exc:
        fail(el, str(exc))
    return _new_disk(
        name,
        included,
        store_type,
        backupmode,
        incremental,
        exportname,
        exportbitmap,
        store,
        driver,
        index,
    )


def _parse_store(el: etree._Element, store_type: StoreType, fmt: str | None) -> BackupStore:
    """The target or scratch of a disk (_parse_disk reads a plain one itself)."""
    want, other = ("dev", "file") if store_type is StoreType.BLOCK else ("file", "dev")
    path = el.get(want)
    if path is None:
        fail(el, f"a disk of type '{store_type}' names its {el.tag} with '{want}'", other)
    if T.abs_path(path) is None:
        T.check(el, want, path, "absFilePath")
    if not len(el):
        return BackupStore(path, fmt)
    seclabels: list[SecLabel] = []
    encryption: Encryption | None = None
    for child in el.iterchildren(_ELEMENT):
        if child.tag == "seclabel":
            seclabels.append(_parse_seclabel(child))
        elif encryption is not None:
            fail(child, "<encryption> may appear only once here")
        else:
            encryption = _parse_encryption(child)
    return BackupStore(path=path, format=fmt, seclabels=tuple(seclabels), encryption=encryption)


def _parse_seclabel(el: etree._Element) -> SecLabel:
    label_el = el.find("label")
    relabel = el.get("relabel")
    try:
        return SecLabel(
            model=T.attr(el, "model", "nonEmpty"),
            relabel=relabel != "no",
            labelskip=el.get("labelskip") == "yes",
            label=T.text(label_el, "nonEmpty") if label_el is not None else None,
        )
    except ValueError as exc:
        fail(el, str(exc))


def _parse_encryption(el: etree._Element) -> Encryption:
    found: dict[str, etree._Element] = {}
    for child in el.iterchildren(_ELEMENT):
        once(set(found), child)
        found[str(child.tag)] = child
    secret_el = found.get("secret")
    cipher_el = found.get("cipher")
    ivgen_el = found.get("ivgen")
    if secret_el is None:
        fail(el, "an <encryption> needs a <secret>")
    secret_uuid = T.attr(secret_el, "uuid", "secretUUID")
    try:
        secret = EncryptionSecret(
            uuid=uuid.UUID(secret_uuid) if secret_uuid is not None else None,
            usage=T.attr(secret_el, "usage", "nonEmpty"),
        )
        return Encryption(
            secret=secret,
            format=EncryptionFormat(el.get("format", "luks")),
            engine=el.get("engine"),
            cipher=None
            if cipher_el is None
            else EncryptionCipher(
                name=T.check(cipher_el, "name", cipher_el.get("name", ""), "nonEmpty"),
                size=int(cipher_el.get("size", "0")),
                mode=T.attr(cipher_el, "mode", "nonEmpty"),
                hash=T.attr(cipher_el, "hash", "nonEmpty"),
            ),
            ivgen=None
            if ivgen_el is None
            else EncryptionIvgen(
                name=T.check(ivgen_el, "name", ivgen_el.get("name", ""), "nonEmpty"),
                hash=T.attr(ivgen_el, "hash", "nonEmpty"),
            ),
        )
    except ValueError as exc:
        fail(el, str(exc))


# --- format --------------------------------------------------------------------------


def _sub(parent: etree._Element, tag: str, **attributes: str | None) -> etree._Element:
    el = etree.SubElement(parent, tag)
    for key, value in attributes.items():
        if value is not None:
            el.set(key, value)
    return el


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else ("yes" if value else "no")


def build_backup_element(defn: BackupDef, parent: etree._Element | None = None) -> etree._Element:
    """BackupDef -> ``<domainbackup>`` element (appended to ``parent`` if given)."""
    el = (
        etree.Element("domainbackup")
        if parent is None
        else etree.SubElement(parent, "domainbackup")
    )
    if defn.mode is not None:
        el.set("mode", str(defn.mode))
    pull = defn.effective_mode is BackupMode.PULL
    if defn.incremental is not None:
        etree.SubElement(el, "incremental").text = defn.incremental
    if defn.server is not None:
        if not pull:
            raise XMLError("<server>: use of <server> requires pull mode backup")
        s = defn.server
        _sub(
            el,
            "server",
            transport=s.transport and str(s.transport),
            tls=_yes_no(s.tls),
            name=s.name,
            port=None if s.port is None else str(s.port),
            socket=s.socket,
            fdgroup=s.fdgroup,
        )
    if defn.disks:
        disks = etree.SubElement(el, "disks")
        for disk in defn.disks:
            _format_disk(disks, disk, pull)
    return el


def _format_disk(parent: etree._Element, disk: BackupDisk, pull: bool) -> None:
    el = _sub(parent, "disk", name=disk.name, backup=_yes_no(disk.backup))
    if disk.backup is False:
        return
    for key, value in (
        ("type", disk.type and str(disk.type)),
        ("backupmode", disk.backupmode and str(disk.backupmode)),
        ("incremental", disk.incremental),
        ("exportname", disk.exportname),
        ("exportbitmap", disk.exportbitmap),
        ("index", None if disk.index is None else str(disk.index)),
    ):
        if value is not None:
            el.set(key, value)
    store = disk.store
    driver = store.format if store is not None else disk.driver
    if driver is not None:
        _sub(el, "driver", type=driver)
    if store is None:
        return
    block = disk.type is StoreType.BLOCK
    store_el = _sub(el, "scratch" if pull else "target", **{"dev" if block else "file": store.path})
    for label in store.seclabels:
        sl = _sub(store_el, "seclabel", model=label.model)
        if label.labelskip:
            sl.set("labelskip", "yes")
        else:
            sl.set("relabel", "yes" if label.relabel else "no")
        if label.label is not None:
            etree.SubElement(sl, "label").text = label.label
    enc = store.encryption
    if enc is not None:
        enc_el = _sub(store_el, "encryption", format=str(enc.format), engine=enc.engine)
        _sub(
            enc_el,
            "secret",
            type="passphrase",
            uuid=None if enc.secret.uuid is None else str(enc.secret.uuid),
            usage=enc.secret.usage,
        )
        if enc.cipher is not None:
            _sub(
                enc_el,
                "cipher",
                name=enc.cipher.name,
                size=str(enc.cipher.size),
                mode=enc.cipher.mode,
                hash=enc.cipher.hash,
            )
        if enc.ivgen is not None:
            _sub(enc_el, "ivgen", name=enc.ivgen.name, hash=enc.ivgen.hash)


# --- align ---------------------------------------------------------------------------


def align_backup(spec: BackupDef, disks: Mapping[str, str], suffix: str) -> BackupDef:
    """libvirt's virDomainBackupAlignDisks against a domain whose disks are ``disks``
    (name -> source path, in domain order).

    Listed disks must exist and are completed (backup='yes', type file, backupmode and
    incremental from the top level, target/scratch ``<source>.<suffix>``); the domain's
    other disks follow as backup='no' — or, when the backup lists no disk at all, are all
    backed up. Raises InvalidArgument for a disk the domain does not have.
    """
    if not disks:
        raise InvalidArgument("domain must have at least one disk to perform backup")
    listed: set[str] = set()
    for disk in spec.disks:
        if disk.name not in disks:
            raise InvalidArgument(f"no disk named '{disk.name}' in the domain")
        if disk.name in listed:
            raise InvalidArgument(f"disk '{disk.name}' specified twice")
        listed.add(disk.name)
    backup_all = not spec.disks
    out: list[BackupDisk] = []
    for disk in spec.disks:
        out.append(
            _align_disk(spec, disk, disks[disk.name], suffix) if disk.backup is not False else disk
        )
    for name, source in disks.items():
        if name in listed:
            continue
        out.append(
            _align_disk(spec, BackupDisk(name=name), source, suffix)
            if backup_all
            else BackupDisk(name=name, backup=False)
        )
    server = spec.server
    if server is not None and server.transport is None:
        server = attrs.evolve(server, transport=ServerTransport.TCP)
    return evolved(spec, mode=spec.effective_mode, server=server, disks=tuple(out))


def _align_disk(spec: BackupDef, disk: BackupDisk, source: str, suffix: str) -> BackupDisk:
    incremental = disk.incremental
    mode = disk.backupmode
    if mode is None:
        mode = (
            DiskBackupMode.INCREMENTAL if spec.incremental or incremental else DiskBackupMode.FULL
        )
    if mode is DiskBackupMode.INCREMENTAL and incremental is None:
        incremental = spec.incremental
        if incremental is None:
            raise InvalidArgument(
                f"'incremental' backup mode of disk '{disk.name}' "
                "requires setting 'incremental' field for disk or backup"
            )
    store = disk.store
    store_type = disk.type or StoreType.FILE
    if store is None:
        if store_type is StoreType.BLOCK:
            raise InvalidArgument(f"refusing to generate a file name for block disk '{disk.name}'")
        store = BackupStore(path=f"{source}.{suffix}", format=disk.driver)
    return evolved(
        disk,
        backup=True,
        type=store_type,
        backupmode=mode,
        incremental=incremental,
        store=store,
        driver=None,
    )
