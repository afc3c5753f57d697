"""The Nu HTML Checker (vnu.jar, npm's ``vnu-jar``) run once over a batch of documents.

Java takes seconds to start, so every document of a test goes to a single run and the
messages are handed back per document.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

# The checker's errors; "info" messages (warnings among them) do not make a page invalid.
FAILING_TYPES = ("error", "non-document-error")
_NAME = re.compile(r"[^A-Za-z0-9_-]+")
# One message of vnu's JSON report: type, message, lastLine, extract, url, ...
Message = dict[str, Any]


@dataclass(frozen=True)
class Checker:
    """Where Java and vnu.jar are."""

    java: str
    jar: Path


def _npm_jar() -> Path | None:
    """vnu.jar of ``npm install -g vnu-jar``, asking npm where global packages live."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    done = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    return Path(done.stdout.strip()) / "vnu-jar" / "build" / "dist" / "vnu.jar"


def find_checker() -> Checker | str:
    """The checker, or why it cannot run here. ``VNU_JAR`` names a jar elsewhere."""
    java = shutil.which("java")
    if java is None:
        return "java is missing (apt-get install -y default-jre-headless)"
    configured = os.environ.get("VNU_JAR")
    jar = Path(configured) if configured else _npm_jar()
    if jar is None or not jar.is_file():
        where = f"VNU_JAR={configured}" if configured else "npm root -g"
        return f"vnu.jar is missing ({where}; npm install -g --ignore-scripts vnu-jar)"
    return Checker(java=java, jar=jar)


def file_name(name: str) -> str:
    """A file name for a document's name, so messages (by file) map back to it."""
    return _NAME.sub("_", name).strip("_") + ".html"


def _write(documents: dict[str, str], folder: Path) -> dict[str, str]:
    """Write each document to a file of its own; return file name: document name."""
    files = {file_name(name): name for name in documents}
    assert len(files) == len(documents), "two documents map to one file name"
    folder.mkdir(parents=True, exist_ok=True)
    for file, name in files.items():
        (folder / file).write_text(documents[name], encoding="utf-8")
    return files


def _run(checker: Checker, paths: list[Path]) -> tuple[list[Message], float]:
    """One vnu run (one Java start-up) over all the files: its messages and wall time."""
    started = time.monotonic()
    done = subprocess.run(
        [checker.java, "-jar", str(checker.jar), "--format", "json", "--stdout", "--exit-zero-always",
         *map(str, paths)],
        capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, f"vnu exited {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout)["messages"], elapsed


def check(checker: Checker, documents: dict[str, str], folder: Path) -> tuple[dict[str, list[Message]], float]:
    """Check ``documents`` (name: HTML) in one run; return each one's failing messages
    (an empty list when it is valid) and the run's wall time."""
    files = _write(documents, folder)
    messages, elapsed = _run(checker, [folder / file for file in files])
    found: dict[str, list[Message]] = {name: [] for name in documents}
    for message in messages:
        if message.get("type") in FAILING_TYPES:
            file = Path(unquote(urlparse(message.get("url", "")).path)).name
            # Not about one of our files (a crash, an I/O error): still a failure, by itself.
            found.setdefault(files.get(file, "(vnu itself)"), []).append(message)
    return found, elapsed


def describe(messages: dict[str, list[Message]]) -> str:
    """One line per error: the page's name, where in it, and the checker's message."""
    return "\n".join(
        f"{name}: line {message.get('lastLine', '?')}: {message.get('message')}"
        f" [{message.get('extract', '').strip()}]"
        for name, page_messages in messages.items()
        for message in page_messages
    )
