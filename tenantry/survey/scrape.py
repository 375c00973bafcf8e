"""Reading routers' per-tenant counters from their Prometheus endpoints (``top --metrics``).

Routers with metrics on export, for their busiest tenants,
``tenantry_tenant_transactions_total{tenant,shard}`` and
``tenantry_tenant_transaction_seconds_total{tenant,shard}``. A scrape reads both from
every endpoint given and adds them up per (shard, tenant); two scrapes make rates. The
text is parsed with ``prometheus_client``'s parser, imported only here and only when
an endpoint is given: it comes with the ``observability`` extra.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from tenantry.errors import ConfigurationError

__all__ = ["TRANSACTIONS", "TRANSACTION_SECONDS", "RouterCounters", "masked", "scrape_routers"]

TRANSACTIONS = "tenantry_tenant_transactions_total"
TRANSACTION_SECONDS = "tenantry_tenant_transaction_seconds_total"

#: (shard, tenant) -> (transactions, seconds)
Counters = dict[tuple[str, str], tuple[float, float]]


@dataclass(frozen=True, slots=True)
class RouterCounters:
    """The per-tenant counters of every router endpoint, summed; and which failed."""

    counters: Counters = field(default_factory=dict)
    #: One line per endpoint that could not be read (its URL masked).
    errors: tuple[str, ...] = ()


def masked(url: str) -> str:
    """*url* without its password, if it has one."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _parser() -> object:
    try:
        from prometheus_client import parser  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigurationError(
            "--metrics needs prometheus_client: pip install 'tenantry[observability]'",
            field="metrics",
        ) from None
    return parser


def _families(text: str) -> Iterable[object]:
    parser = _parser()
    return parser.text_string_to_metric_families(text)  # type: ignore[attr-defined,no-any-return]


def scrape_routers(urls: Iterable[str], *, timeout: float = 3.0) -> RouterCounters:
    """Read every endpoint in *urls* (each given *timeout* seconds) and sum the
    per-tenant counters by (shard, tenant). An endpoint that cannot be read is named
    in ``errors``; the others count."""
    urls = list(urls)
    if urls:
        _parser()  # say what to install before anything is fetched
    counters: Counters = {}
    errors: list[str] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
            for family in _families(text):
                for sample in family.samples:  # type: ignore[attr-defined]
                    if sample.name not in (TRANSACTIONS, TRANSACTION_SECONDS):
                        continue
                    key = (
                        str(sample.labels.get("shard", "")),
                        str(sample.labels.get("tenant", "")),
                    )
                    if not key[1]:
                        continue
                    count, seconds = counters.get(key, (0.0, 0.0))
                    if sample.name == TRANSACTIONS:
                        count += float(sample.value)
                    else:
                        seconds += float(sample.value)
                    counters[key] = (count, seconds)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            errors.append(f"router metrics {masked(url)}: {exc}")
    return RouterCounters(counters, tuple(errors))
