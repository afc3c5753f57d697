"""What a wheel carries. setup.cfg lists its packages by hand (``find:`` cannot map
``migrations/`` to ``myapp.migrations``), so a new package under ``myapp/`` must be
added there: an editable install would import it anyway, a wheel would lack it."""

from __future__ import annotations

import configparser
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_setup_cfg_lists_every_package_under_myapp() -> None:
    setup_cfg = configparser.ConfigParser()
    assert setup_cfg.read(ROOT / "setup.cfg"), "no setup.cfg"
    listed = set(setup_cfg["options"]["packages"].split())
    missing = set(find_packages(str(ROOT), include=["myapp", "myapp.*"])) - listed
    assert not missing, f"add {', '.join(sorted(missing))} to [options] packages in setup.cfg"
