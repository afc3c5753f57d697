"""The benchmark's baseline (bench/baseline.py) is served from its own extracted tree:
its workers must import that tree's ``myapp``, not the checkout installed in the venv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.baseline import TREE, BaselineUnavailable, environment, extract

ROOT = Path(__file__).resolve().parent.parent


def test_the_extracted_tree_is_what_the_baseline_server_imports(tmp_path: Path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert extract("HEAD", tmp_path) == head.stdout.strip()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(TREE)
    assert (tmp_path / "myapp" / "__init__.py").is_file()

    # With the baseline server's environment, and without the working folder on sys.path
    # (-P): what gunicorn's script starts with before it adds its folder.
    shown = _imported(tmp_path, environment(tmp_path), "bench", "myapp", "myapp.config")
    assert shown == [
        str(ROOT / "bench" / "__init__.py"),  # bench/served_wsgi.py stays this checkout's
        str(tmp_path / "myapp" / "__init__.py"),
        str(tmp_path / "myapp" / "config.py"),
    ]
    # Control: without it, the venv's editable install hands out this checkout's myapp.
    assert _imported(tmp_path, {}, "myapp") == [str(ROOT / "myapp" / "__init__.py")]


def _imported(cwd: Path, extra: dict[str, str], *modules: str) -> list[str]:
    code = "import importlib; " + "; ".join(f"print(importlib.import_module({name!r}).__file__)" for name in modules)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=cwd, env={**env, **extra}, capture_output=True, text=True, check=True,
    ).stdout.split()


def test_an_unknown_revision_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(BaselineUnavailable, match="rev-parse"):
        extract("no-such-revision-anywhere", tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_median_interval_is_the_order_statistics_with_their_binomial_coverage() -> None:
    from bench.report import median_interval

    assert median_interval([0.9, 1.1]) is None  # too few repeats to say anything
    assert median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0, 1 - 2 / 32)  # 5 repeats: min to max, 93.75 %
    low, high, coverage = median_interval([float(x) for x in range(10)])  # type: ignore[misc]
    assert (low, high) == (1.0, 8.0) and round(coverage, 4) == 0.9785
