"""Reading this process's outside-Ray metrics back (``monitoring.exposition``) in unit tests."""

from __future__ import annotations

from foveation import monitoring


def recorded(name: str, **labels: str) -> float:
    """The value of metric ``name`` (without Ray's prefix), summed over the series whose labels
    include ``labels``; 0 when none was recorded."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(monitoring.exposition())
        for s in fam.samples
        if s.name == monitoring.PREFIX + name and labels.items() <= s.labels.items()
    )
