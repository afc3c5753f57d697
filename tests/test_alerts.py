"""The alert rules of deploy/prometheus (issue 18, point 4), checked by Debian's promtool:
the rules parse, their unit tests (alerts_test.yml) pass, and the example scrape config
is valid. Controls show that the unit tests catch a rule with a wrong threshold.

promtool comes with Debian's ``prometheus`` package; without it these tests skip on a
laptop and fail under ``CI`` (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.topology.fixtures import require

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"

ALERTS = {
    "MyappDatabaseUnreachable", "MyappDatabasePoolSaturated", "MyappReplicaLagging",
    "MyappNoReplicaInRotation", "MyappLostWrites", "MyappHighErrorRate",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None and os.access("/usr/bin/promtool", os.X_OK):
        found = "/usr/bin/promtool"
    require(found is not None, "no promtool (Debian's prometheus package): the alert rule tests need it")
    assert found is not None
    return found


def run(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """promtool with ``args``; its report, stdout and stderr together, in ``.stdout``."""
    return subprocess.run(
        [promtool, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, timeout=120,
    )


def test_the_rules_are_valid(promtool: str) -> None:
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout, result.stdout


def test_the_rules_are_the_issue_s_alerts_each_with_for_severity_and_annotations() -> None:
    text = RULES.read_text()
    assert sorted(re.findall(r"^ +- alert: (\w+)$", text, re.MULTILINE)) == sorted(ALERTS)
    for block in re.split(r"\n(?= +- alert: )", text)[1:]:
        for needed in (r"\n\s+for: \d+[smh]\n", r"\n\s+severity: (critical|warning)\n",
                       r"\n\s+summary: ", r"\n\s+description: ", r"DATABASE_\w+|REQUEST_LOG"):
            assert re.search(needed, block), f"{needed!r} missing in:\n{block}"


def test_every_alert_has_a_case_that_fires_and_one_that_must_not() -> None:
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?\n", RULE_TESTS.read_text())
    assert {name for name, empty in cases if not empty} == ALERTS
    assert {name for name, empty in cases if empty} == ALERTS


def test_the_rules_pass_their_unit_tests(promtool: str) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout, result.stdout


def test_the_example_config_is_valid_and_loads_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", CONFIG)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    assert re.search(r"\n\s+- 127\.0\.0\.1:9200\n", CONFIG.read_text()), "not METRICS_BIND's default"
    assert re.search(r"\n\s+scrape_interval: 15s\n", CONFIG.read_text())


# A rule changed the wrong way, and the case in alerts_test.yml that must then fail.
WRONG_RULES = {
    "5xx threshold lowered to 0.1%": (
        "> 0.01\n", "> 0.001\n", "0.5% of requests failing, or a 3-minute burst, does not fire"),
    "replica lag threshold raised to 20 s": (
        "myapp_db_replica_lag_seconds > 10", "myapp_db_replica_lag_seconds > 20",
        "a replica past 10 s or past 16 MB for 1 min fires, for that replica only"),
    "breaker alert's for shortened to 15 s": (
        "(myapp_db_breaker_open) > 0\n        for: 30s", "(myapp_db_breaker_open) > 0\n        for: 15s",
        "a breaker open on one worker for over 30 s fires, for that server only"),
}


@pytest.mark.parametrize("wrong", list(WRONG_RULES))
def test_the_unit_tests_catch_a_wrong_rule(promtool: str, tmp_path: Path, wrong: str) -> None:
    """Control: the same unit tests, on a copy of the rules with one change, fail."""
    right, changed, failing_case = WRONG_RULES[wrong]
    rules = RULES.read_text()
    assert rules.count(right) == 1, f"{right!r} is no longer in alerts.yml once: update this control"
    (tmp_path / RULES.name).write_text(rules.replace(right, changed))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run(promtool, "test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stdout and f"name: {failing_case}," in result.stdout, result.stdout
