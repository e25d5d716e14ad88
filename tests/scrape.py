"""Scraping a live process's /metrics the way Prometheus does, parsed by prometheus_client's parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape: its families by name, and sample values by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float | None:
        """The value of the sample whose labels include `labels`; None when there is none. Several
        matching samples (a label left out) are summed."""
        found = [s.value for f in self.families.values() for s in f.samples
                 if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
        return sum(found) if found else None

    def labels(self, sample: str) -> list[dict[str, str]]:
        return [s.labels for f in self.families.values() for s in f.samples if s.name == sample]


def scrape(url: str, **kwargs) -> Scrape:
    r = httpx.get(url, timeout=30, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return Scrape(r.text)
