"""Reading Prometheus metrics in a test: this process's values before and after, and a
served exposition (a gunicorn master's)."""

from __future__ import annotations

import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def sample(name: str, **labels: str) -> float:
    """The current value of one sample (0 when it has not been recorded yet)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def exists(name: str, **labels: str) -> bool:
    """Whether the sample has a series yet (a labelled one appears with its first child)."""
    return REGISTRY.get_sample_value(name, labels) is not None


class Delta:
    """How much samples grew since the Delta was made: ``delta("x_total", l="v")``."""

    def __init__(self) -> None:
        self._before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for metric in REGISTRY.collect():
            for each in metric.samples:
                self._before[(each.name, tuple(sorted(each.labels.items())))] = each.value

    def __call__(self, name: str, **labels: str) -> float:
        return sample(name, **labels) - self._before.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(url: str) -> Samples:
    """A served exposition, as {(sample name, sorted labels): value}."""
    body = requests.get(url, timeout=10).text
    return {(each.name, tuple(sorted(each.labels.items()))): each.value
            for family in text_string_to_metric_families(body) for each in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    return sum(value for (sample, keys), value in samples.items()
               if sample == name and set(labels.items()) <= set(keys))
