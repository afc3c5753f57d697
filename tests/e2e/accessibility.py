"""axe-core (npm's ``axe-core``), run inside the browser on the page as it was built.

The script is given to the page through the DevTools protocol (Playwright's
``evaluate``), which the site's Content Security Policy does not govern, so the pages
are audited with their real headers. Rules: WCAG 2.0, 2.1 and 2.2, levels A and AA,
plus axe's best practices.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RULE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]
_RUN = """async (tags) => {
    const result = await axe.run(document, {runOnly: {type: "tag", values: tags}});
    return result.violations.map(v => ({
        id: v.id, impact: v.impact, help: v.help,
        targets: v.nodes.slice(0, 3).map(n => n.target.join(" ")),
    }));
}"""


@dataclass(frozen=True)
class Axe:
    """axe-core's script, read once."""

    source: str
    version: str

    def audit(self, page: Any) -> list[str]:
        """The page's violations, one line each: rule, impact, what, where."""
        if not page.evaluate("() => typeof axe !== 'undefined'"):
            page.evaluate(self.source)
        return [
            f"{found['id']} ({found['impact']}): {found['help']} at {', '.join(found['targets'])}"
            for found in page.evaluate(_RUN, RULE_TAGS)
        ]


def find_axe() -> Axe | str:
    """axe-core from ``AXE_JS`` or npm's global folder, or why it is missing."""
    path = Path(os.environ["AXE_JS"]) if os.environ.get("AXE_JS") else _npm_global() / "axe-core" / "axe.min.js"
    if not path.is_file():
        return f"axe-core is missing ({path}; npm install -g axe-core, or set AXE_JS)"
    source = path.read_text(encoding="utf-8")
    version = source.split("axe v", 1)[1].split(None, 1)[0] if "axe v" in source[:200] else "?"
    return Axe(source, version)


def _npm_global() -> Path:
    npm = shutil.which("npm")
    if npm is None:
        return Path("/usr/lib/node_modules")
    found = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=60)
    return Path(found.stdout.strip() or "/usr/lib/node_modules")
