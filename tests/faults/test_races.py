"""Scenario 6: races that must neither lose nor duplicate data, over real gunicorn.

Fifty browsers register the same name at once (also spelled ``Alice``/``alice``/
`` alice ``): one account, 49 form errors, no 500, on every backend. Ten browsers
save the same post at once: one save wins, the others get the 409 page with their
own text kept, and the row holds exactly the acknowledged text.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import func, select

from myapp.auth import USERNAME_TAKEN
from myapp.db import db
from myapp.models import Post, User
from tests.support.databases import Backend
from tests.support.forms import csrf_token, post_form
from tests.support.gunicorn import Server, stop_gunicorn

from .figures import record
from .raisingapp import serve

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.real_commits]

REGISTRATIONS = 50
EDITORS = 10
CONFLICT_TEXT = "changed by someone else while you were editing"


@pytest.fixture
def server(app: Flask, backend: Backend, tmp_path: Path) -> Iterator[Server]:
    """gunicorn, 2 workers x 4 threads, on the backend's throwaway database."""
    running = serve(backend.url.render_as_string(hide_password=False), tmp_path)
    try:
        yield running
    finally:
        stop_gunicorn(running)


def _at_once(count: int, action: Callable[[int], requests.Response]) -> list[requests.Response]:
    """Run ``action(i)`` in ``count`` threads released together by a barrier."""
    barrier = threading.Barrier(count)

    def run(i: int) -> requests.Response:
        barrier.wait(timeout=30)
        return action(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


@pytest.mark.parametrize(
    "spellings",
    [pytest.param(["racer"], id="same-name"), pytest.param(["Alice", "alice", " alice ", "ALICE"], id="case-variants")],
)
def test_fifty_concurrent_registrations_make_one_account(
    server: Server, app: Flask, backend: Backend, spellings: list[str]
) -> None:
    url = f"{server.url}/auth/register"
    browsers = [requests.Session() for _ in range(REGISTRATIONS)]
    tokens = [csrf_token(browser.get(url, timeout=30).text) for browser in browsers]

    def register(i: int) -> requests.Response:
        data = {"csrf_token": tokens[i], "username": spellings[i % len(spellings)], "password": "correct horse"}
        return browsers[i].post(url, data=data, timeout=60, allow_redirects=False)

    responses = _at_once(REGISTRATIONS, register)
    for browser in browsers:
        browser.close()

    created = sum(r.status_code == 302 for r in responses)
    form_errors = sum(r.status_code == 200 and USERNAME_TAKEN in r.text for r in responses)
    server_errors = sum(r.status_code >= 500 for r in responses)
    expected = spellings[0].strip().casefold()
    with app.app_context():
        accounts = db.session.scalars(select(User.username)).all()

    injected = f"{REGISTRATIONS} concurrent registrations of {'/'.join(repr(s) for s in spellings)}"
    record("6 races", backend.name, injected, "accounts created", len(accounts), "1", accounts == [expected])
    record("6 races", backend.name, injected, "'already taken' form errors", form_errors,
           str(REGISTRATIONS - 1), form_errors == REGISTRATIONS - 1)
    record("6 races", backend.name, injected, "500s", server_errors, "0", server_errors == 0)
    assert Counter(r.status_code for r in responses) == {302: 1, 200: REGISTRATIONS - 1}
    assert (created, form_errors, server_errors) == (1, REGISTRATIONS - 1, 0)
    assert accounts == [expected]


def test_concurrent_edits_lose_nothing_and_losers_keep_their_text(
    server: Server, app: Flask, backend: Backend
) -> None:
    author = requests.Session()
    assert post_form(author, f"{server.url}/auth/register", username="editor", password="correct horse").status_code == 302
    assert post_form(author, f"{server.url}/auth/login", username="editor", password="correct horse").status_code == 302
    created = post_form(author, f"{server.url}/posts/new", title="Shared post", body="first version")
    assert created.status_code == 302
    edit_url = server.url + created.headers["Location"] + "/edit"

    editors = []
    for _ in range(EDITORS):  # every editor loads the form (version 1) before anyone saves
        editor = requests.Session()
        editor.cookies.update(author.cookies)
        page = editor.get(edit_url, timeout=30).text
        version = re.search(r'name="version" type="hidden" value="([^"]*)"', page)
        assert version and version.group(1) == "1"
        editors.append((editor, csrf_token(page)))

    def save(i: int) -> requests.Response:
        editor, token = editors[i]
        data = {"csrf_token": token, "title": "Shared post", "body": f"text of editor {i}", "version": "1"}
        return editor.post(edit_url, data=data, timeout=60, allow_redirects=False)

    responses = _at_once(EDITORS, save)
    saved = [i for i, r in enumerate(responses) if r.status_code == 302]
    conflicts_keeping_text = [
        i for i, r in enumerate(responses)
        if r.status_code == 409 and CONFLICT_TEXT in r.text and f"text of editor {i}" in r.text
    ]
    with app.app_context():
        post = db.session.scalars(select(Post)).one()
        post_count = db.session.scalar(select(func.count(Post.id)))

    lost = 0 if len(saved) == 1 and post.body == f"text of editor {saved[0]}" else 1
    injected = f"{EDITORS} concurrent saves of one post (all from version 1)"
    record("6 races", backend.name, injected, "acknowledged saves", len(saved), "1", len(saved) == 1)
    record("6 races", backend.name, injected, "409 pages keeping the editor's text", len(conflicts_keeping_text),
           str(EDITORS - 1), len(conflicts_keeping_text) == EDITORS - 1)
    record("6 races", backend.name, injected, "silent lost updates", lost, "0", lost == 0)
    assert Counter(r.status_code for r in responses) == {302: 1, 409: EDITORS - 1}
    assert len(conflicts_keeping_text) == EDITORS - 1
    assert (post_count, post.body, post.version) == (1, f"text of editor {saved[0]}", 2)
