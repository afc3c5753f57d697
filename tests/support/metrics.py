"""Reading the process's Prometheus metrics in a test: values before and after."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    """The current value of one sample (0 when it has not been recorded yet)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Delta:
    """How much samples grew since the Delta was made: ``delta("x_total", l="v")``."""

    def __init__(self) -> None:
        self._before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for metric in REGISTRY.collect():
            for each in metric.samples:
                self._before[(each.name, tuple(sorted(each.labels.items())))] = each.value

    def __call__(self, name: str, **labels: str) -> float:
        return sample(name, **labels) - self._before.get((name, tuple(sorted(labels.items()))), 0.0)
