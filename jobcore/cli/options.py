"""Arguments and options several commands share: JOB and DOMAIN (with shell completion
from the connection), ``--json``, ``--timeout``, BANDWIDTH, XML FILE arguments."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import click
from click.shell_completion import CompletionItem

import jobcore
from jobcore.cli import declare
from jobcore.cli.errors import ExitCode, fail
from jobcore.cli.session import default_uri, resolve_uri

if TYPE_CHECKING:
    from jobcore.api import Connection

# ---- shell completion -------------------------------------------------------------------


def _completions(
    click_ctx: click.Context, fetch: Callable[[Connection], Awaitable[list[str]]]
) -> list[str]:
    """Names ``fetch`` gets from the command line's connection within 3 s; nothing on any
    error (completion must never print or hang)."""
    import anyio

    given = click_ctx.find_root().params.get("uri")

    async def main() -> list[str]:
        uri = resolve_uri(given) if given else default_uri()
        with anyio.move_on_after(3.0):
            async with jobcore.connect(uri) as conn:
                return await fetch(conn)
        return []

    try:
        return anyio.run(main)
    except BaseException:
        return []


async def _domain_names(conn: Connection) -> list[str]:
    return [d.name for d in await conn.list_domains()]


async def _job_ids(conn: Connection) -> list[str]:
    ids: list[str] = []
    for dom in await conn.list_domains():
        ids += [str(j.uuid) for j in await dom.list_jobs()]
    return ids


def complete_domain(
    click_ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    names = _completions(click_ctx, _domain_names)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_job(
    click_ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    fetch = _domain_names if click_ctx.params.get("legacy") else _job_ids
    names = _completions(click_ctx, fetch)
    return [CompletionItem(n) for n in names if n.startswith(incomplete.lower())]


async def _host_names(conn: Connection) -> list[str]:
    return [h.name for h in await conn.fleet_hosts()]


def complete_host(
    click_ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """A fleet member's name (nothing where the connection is no fleet member)."""
    names = _completions(click_ctx, _host_names)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


# ---- shared arguments and options -------------------------------------------------------

json_option = declare.JSON.click_option()
job_argument = click.argument("job", shell_complete=complete_job)
domain_filter_option = declare.DOMAIN_FILTER.click_option(shell_complete=complete_domain)


def _check_timeout(_ctx: click.Context, _param: click.Parameter, value: float | None) -> Any:
    if value is not None and (math.isnan(value) or value < 0):
        raise click.BadParameter(f"{value} is not a number of seconds >= 0")
    return value


def timeout_option(help_text: str) -> Callable[[Any], Any]:
    """``--timeout SECONDS``: a number >= 0 (NaN or negative: a usage error)."""
    return click.option("--timeout", type=float, callback=_check_timeout, help=help_text)


def read_xml(file: BinaryIO, root: str) -> bytes:
    """At most the XML size limit of ``file`` (plus one byte, to tell a file over the
    limit, which is refused here: /dev/zero or an endless pipe never fills memory)."""
    from jobcore.xml._parse import MAX_DOCUMENT_BYTES  # lxml: only for commands reading XML

    data = file.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        fail(
            ExitCode.ERROR,
            f"{file.name}: <{root}> document refused: it is larger than the "
            f"limit of {MAX_DOCUMENT_BYTES} bytes (1 MiB)",
        )
    return data


# ---- bandwidth arguments -----------------------------------------------------------------

#: libvirt's scaled-integer suffixes (virScaleInteger): a bare letter or ``XiB`` is a power of
#: 1024, ``XB`` a power of 1000; ``/s`` may follow.
_SCALE = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_BANDWIDTH = re.compile(r"(?P<n>\d+)\s*(?P<unit>(?P<p>[kmgtpe])(?P<base>i?b)?|b)?(?:/s)?", re.I)
MAX_BANDWIDTH = (1 << 63) - 1


def parse_bandwidth(text: str) -> int:
    """Bytes per second from ``1048576``, ``100MiB``, ``100M``, ``1GB/s``, … (0: unlimited)."""
    m = _BANDWIDTH.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"'{text}' is not a bandwidth: give bytes/s (e.g. 1048576) or an integer with a "
            "unit: B, KiB, MiB, GiB, TiB, PiB, EiB (or K, M, G, … the same), "
            "KB, MB, GB, TB, PB, EB (powers of 1000); '/s' may follow"
        )
    base = 1000 if (m["base"] or "").lower() == "b" else 1024
    value: int = int(m["n"]) * pow(base, _SCALE[(m["p"] or "").lower()])
    if value > MAX_BANDWIDTH:
        raise ValueError(f"'{text}' is too large (at most {MAX_BANDWIDTH} bytes/s)")
    return value


def bandwidth_arg(click_ctx: click.Context, param: click.Parameter, value: str) -> int:
    """Click callback: BANDWIDTH parsed, or a usage error naming the units."""
    try:
        return parse_bandwidth(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), click_ctx, param) from None
