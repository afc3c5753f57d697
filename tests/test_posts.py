"""Posts: writing, listing, paging, editing with a version check, deleting, escaping,
and a constant number of queries per page, on every backend."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, select

from myapp.db import AppSession, db
from myapp.models import Post, User
from myapp.posts import BODY_MAX_LENGTH
from tests.support.auth import AuthActions
from tests.support.posts import add_posts
from tests.support.certification import CertificationFailures
from tests.support.queries import assert_num_queries

# The longest body in bytes: 20,000 four-byte characters, 80,000 bytes (over TEXT on MariaDB).
_LARGEST_BODY = "\U0001f600" * BODY_MAX_LENGTH
_TITLES = re.compile(r'<h2><a href="/posts/\d+">(.*?)</a></h2>')
_CONFLICT = "This post was changed by someone else while you were editing."


def stored_posts(app: Flask) -> list[tuple[str, str, str, int]]:
    """(title, body, author, version) of every stored post, oldest first, read through
    the app's session so that rows inside the test's outer transaction are visible."""
    with app.app_context():
        rows = db.session.execute(
            select(Post.title, Post.body, User.username, Post.version).join(Post.author).order_by(Post.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def titles(html: str) -> list[str]:
    return _TITLES.findall(html)


def field_error(html: str, field: str) -> list[str]:
    match = re.search(rf'<div class="field has-error">\s*<label for="{field}">(.*?)</div>', html, re.DOTALL)
    return re.findall(r'<p class="field-error">(.*?)</p>', match.group(1)) if match else []


def write(client: FlaskClient, title: str = "Hello", body: str = "First post.") -> int:
    response = client.post("/posts/new", data={"title": title, "body": body})
    assert response.status_code == 302, response.get_data(as_text=True)
    return int(response.headers["Location"].rsplit("/", 1)[1])


# -- create ----------------------------------------------------------------------------


def test_create_saves_the_post_with_its_author(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()

    response = client.post("/posts/new", data={"title": "  Hello  ", "body": "First post."})

    assert response.status_code == 302
    assert re.fullmatch(r"/posts/\d+", response.headers["Location"])
    assert stored_posts(app) == [("Hello", "First post.", "alice", 1)]
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Your post is published." in page and "<h1>Hello</h1>" in page


@pytest.mark.parametrize(
    ("title", "body"),
    [
        pytest.param("\U0001f600" * 200, "b", id="title-200-four-byte-chars"),
        pytest.param("t", "b" * BODY_MAX_LENGTH, id="body-at-the-limit"),
        pytest.param("t", "\u00e9" * BODY_MAX_LENGTH, id="body-limit-two-byte-chars"),
        pytest.param("t", _LARGEST_BODY, id="body-80000-bytes"),
    ],
)
def test_create_stores_the_largest_accepted_post(
    app: Flask, client: FlaskClient, auth: AuthActions, title: str, body: str
) -> None:
    """What the form accepts, every backend stores whole: on MariaDB the body is a
    MEDIUMTEXT, since TEXT's 65,535 bytes would refuse 20,000 emoji."""
    auth.register_and_login()

    write(client, title, body)

    assert stored_posts(app) == [(title, body, "alice", 1)]


_REQUIRED = "This field is required."
_NOT_ALLOWED = "This field contains a character that is not allowed."


@pytest.mark.parametrize(
    ("title", "body", "field", "message"),
    [
        pytest.param("", "body", "title", _REQUIRED, id="empty-title"),
        pytest.param("   ", "body", "title", _REQUIRED, id="blank-title"),
        pytest.param("t" * 201, "body", "title", "Field cannot be longer than 200 characters.", id="long-title"),
        pytest.param("title", "", "body", _REQUIRED, id="empty-body"),
        pytest.param(
            "title", "b" * (BODY_MAX_LENGTH + 1), "body", "Field cannot be longer than 20000 characters.", id="long-body"
        ),
        pytest.param("ti\x00tle", "body", "title", _NOT_ALLOWED, id="nul-in-title"),
        pytest.param("title", "bo\x00dy", "body", _NOT_ALLOWED, id="nul-in-body"),
    ],
)
def test_create_rejects_bad_input_next_to_the_field(
    app: Flask, client: FlaskClient, auth: AuthActions, title: str, body: str, field: str, message: str
) -> None:
    auth.register_and_login()

    response = client.post("/posts/new", data={"title": title, "body": body})

    assert response.status_code == 200
    assert field_error(response.get_data(as_text=True), field) == [message]
    assert stored_posts(app) == []


def test_create_needs_a_login(app: Flask, client: FlaskClient) -> None:
    response = client.post("/posts/new", data={"title": "Hello", "body": "First post."})

    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/login?next=/posts/new"
    assert stored_posts(app) == []


# -- index and user pages --------------------------------------------------------------


def test_index_lists_newest_first_with_authors(app: Flask, client: FlaskClient) -> None:
    add_posts(app, 3)

    page = client.get("/").get_data(as_text=True)

    assert titles(page) == ["post 2", "post 1", "post 0"]
    assert 'by <a href="/users/carol">carol</a>' in page


def test_index_without_posts_says_so(client: FlaskClient) -> None:
    response = client.get("/")

    assert response.status_code == 200
    assert "No posts yet." in response.get_data(as_text=True)
    assert 'rel="next"' not in response.get_data(as_text=True)


@pytest.mark.parametrize("app_config", [{"POSTS_PER_PAGE": 2}])
def test_index_pages(app: Flask, client: FlaskClient) -> None:
    add_posts(app, 5)

    pages = [client.get(f"/?page={number}") for number in (1, 2, 3, 4)]

    assert [response.status_code for response in pages[:3]] == [200, 200, 200]
    first, second, third = (response.get_data(as_text=True) for response in pages[:3])
    assert titles(first) == ["post 4", "post 3"]
    assert titles(second) == ["post 2", "post 1"]
    assert titles(third) == ["post 0"]
    assert 'rel="next" href="/?page=2"' in first and 'rel="prev"' not in first
    assert 'rel="next" href="/?page=3"' in second and 'rel="prev" href="/?page=1"' in second
    assert 'rel="next"' not in third and 'rel="prev" href="/?page=2"' in third
    assert pages[3].status_code == 404  # past the end


@pytest.mark.parametrize("app_config", [{"POSTS_PER_PAGE": 2}])
def test_exactly_full_last_page_has_no_next(app: Flask, client: FlaskClient) -> None:
    add_posts(app, 4)

    second = client.get("/?page=2").get_data(as_text=True)

    assert titles(second) == ["post 1", "post 0"]
    assert 'rel="next"' not in second
    assert client.get("/?page=3").status_code == 404


@pytest.mark.parametrize(
    "raw", ["0", "-1", "abc", "1.5", "", " 1", "0x1", "99999999999999999999", "10001", "\u00b2", "\u0661", "1\x00"]
)
@pytest.mark.parametrize("path", ["/", "/users/alice"])
def test_bad_page_numbers_are_404(app: Flask, client: FlaskClient, path: str, raw: str) -> None:
    add_posts(app, 1, authors=("alice",))

    response = client.get(path, query_string={"page": raw})

    assert response.status_code == 404
    assert 'class="site-header"' in response.get_data(as_text=True)


@pytest.mark.parametrize("app_config", [{"POSTS_PER_PAGE": 2}])
def test_user_page_lists_only_that_users_posts_and_pages(app: Flask, client: FlaskClient) -> None:
    add_posts(app, 9)  # alice wrote 0, 3, 6

    first = client.get("/users/alice").get_data(as_text=True)
    second = client.get("/users/alice?page=2").get_data(as_text=True)

    assert "<h1>Posts by alice</h1>" in first
    assert titles(first) == ["post 6", "post 3"]
    assert 'rel="next" href="/users/alice?page=2"' in first
    assert titles(second) == ["post 0"] and 'rel="next"' not in second
    assert client.get("/users/alice?page=3").status_code == 404


@pytest.mark.parametrize("typed", ["ALICE", "Alice", "%20alice%20"])
def test_user_page_ignores_case(app: Flask, client: FlaskClient, typed: str) -> None:
    add_posts(app, 2, authors=("alice", "bob"))

    response = client.get(f"/users/{typed}")

    assert response.status_code == 200
    assert titles(response.get_data(as_text=True)) == ["post 0"]


@pytest.mark.parametrize("name", ["nobody", "al%00ice", "a" * 300, "%F0%9F%98%80"])
def test_user_page_for_unknown_user_is_404(app: Flask, client: FlaskClient, name: str) -> None:
    add_posts(app, 1, authors=("alice",))

    response = client.get(f"/users/{name}")

    assert response.status_code == 404
    assert 'class="site-header"' in response.get_data(as_text=True)


# -- constant query counts ---------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 5, 45])
def test_index_costs_one_query_anonymous(app: Flask, client: FlaskClient, count: int) -> None:
    add_posts(app, count, authors=("alice", "bob", "carol", "dave", "erin"))

    for number in (1, 2):
        with assert_num_queries(app, 1):
            response = client.get(f"/?page={number}")
        shown = titles(response.get_data(as_text=True))
        assert len(shown) == max(0, min(20, count - 20 * (number - 1)))
        assert response.status_code == (200 if number == 1 or count > 20 else 404)


@pytest.mark.parametrize("count", [0, 5, 45])
def test_index_costs_two_queries_logged_in(app: Flask, client: FlaskClient, auth: AuthActions, count: int) -> None:
    """One to load the logged-in user, one for the page."""
    auth.register_and_login()
    add_posts(app, count, authors=("alice", "bob", "carol", "dave", "erin"))

    for number in (1, 2):
        with assert_num_queries(app, 2):
            response = client.get(f"/?page={number}")
        assert len(titles(response.get_data(as_text=True))) == max(0, min(20, count - 20 * (number - 1)))


@pytest.mark.parametrize("count", [1, 45])
def test_user_page_costs_two_queries_anonymous(app: Flask, client: FlaskClient, count: int) -> None:
    add_posts(app, count, authors=("alice", "bob"))

    with assert_num_queries(app, 2):
        response = client.get("/users/alice")

    assert len(titles(response.get_data(as_text=True))) == min(20, (count + 1) // 2)


def test_post_page_costs_one_query_anonymous(app: Flask, client: FlaskClient) -> None:
    [post_id] = add_posts(app, 1)

    with assert_num_queries(app, 1):
        response = client.get(f"/posts/{post_id}")

    assert response.status_code == 200
    assert 'by <a href="/users/alice">alice</a>' in response.get_data(as_text=True)


# -- detail ------------------------------------------------------------------------------


def test_detail_shows_the_post(app: Flask, client: FlaskClient) -> None:
    [post_id] = add_posts(app, 1)

    page = client.get(f"/posts/{post_id}").get_data(as_text=True)

    assert "<h1>post 0</h1>" in page and '<div class="body">body 0</div>' in page
    assert "/edit" not in page  # anonymous visitors get no edit link


def test_post_times_are_valid_html_datetimes(app: Flask, client: FlaskClient) -> None:
    """HTML allows 1 to 3 fractional digits in <time datetime>; isoformat() wrote 6,
    which the Nu HTML Checker reports on every page listing a post."""
    [post_id] = add_posts(app, 1)
    with app.app_context(), db.transaction() as session:
        session.get_one(Post, post_id).created_at = datetime(2026, 1, 2, 3, 4, 5, 678901)

    for path in ("/", "/users/alice", f"/posts/{post_id}"):
        page = client.get(path).get_data(as_text=True)
        # Stored in UTC (models.utcnow), so the value says so; to the second, like the text.
        assert re.findall(r'<time datetime="([^"]*)">', page) == ["2026-01-02T03:04:05Z"], path


@pytest.mark.parametrize("path", ["/posts/{missing}", "/posts/0", "/posts/-1", "/posts/2147483648", "/posts/99999999999999999999"])
def test_detail_of_missing_post_is_404(app: Flask, client: FlaskClient, path: str) -> None:
    [post_id] = add_posts(app, 1)

    response = client.get(path.format(missing=post_id + 1))

    assert response.status_code == 404
    assert 'class="site-header"' in response.get_data(as_text=True)


# -- edit --------------------------------------------------------------------------------


def test_author_edits_and_the_version_increments(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()
    post_id = write(client, "Hello", "First post.")
    form = client.get(f"/posts/{post_id}/edit").get_data(as_text=True)
    assert 'name="version" type="hidden" value="1"' in form

    response = client.post(f"/posts/{post_id}/edit", data={"title": "Hello again", "body": "Edited.", "version": "1"})

    assert response.status_code == 302
    assert response.headers["Location"] == f"/posts/{post_id}"
    assert stored_posts(app) == [("Hello again", "Edited.", "alice", 2)]
    assert "edited" in client.get(f"/posts/{post_id}").get_data(as_text=True)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_others_cannot_edit(app: Flask, client: FlaskClient, auth: AuthActions, method: str) -> None:
    auth.register_and_login("alice")
    post_id = write(client, "Hello", "First post.")
    auth.logout()
    auth.register_and_login("bob")

    response = client.open(
        f"/posts/{post_id}/edit", method=method, data={"title": "Hijacked", "body": "Bob was here.", "version": "1"}
    )

    assert response.status_code == 403
    assert 'class="site-header"' in response.get_data(as_text=True)
    assert stored_posts(app) == [("Hello", "First post.", "alice", 1)]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_anonymous_edit_goes_to_login(app: Flask, client: FlaskClient, method: str) -> None:
    [post_id] = add_posts(app, 1)

    response = client.open(f"/posts/{post_id}/edit", method=method, data={"title": "x", "body": "y", "version": "1"})

    assert response.status_code == 302
    assert response.headers["Location"] == f"/auth/login?next=/posts/{post_id}/edit"
    assert stored_posts(app) == [("post 0", "body 0", "alice", 1)]


def test_edit_of_missing_post_is_404(client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()

    assert client.get("/posts/1/edit").status_code == 404
    assert client.get("/posts/99999999999999999999/edit").status_code == 404


def test_stale_edit_is_a_409_that_keeps_the_text(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    """The form was loaded at version 1; someone saved version 2 meanwhile. The late
    save must neither overwrite theirs nor lose the user's words."""
    auth.register_and_login()
    post_id = write(client, "Hello", "First post.")
    theirs = {"title": "Their title", "body": "Their body.", "version": "1"}
    assert client.post(f"/posts/{post_id}/edit", data=theirs).status_code == 302

    response = client.post(
        f"/posts/{post_id}/edit", data={"title": "My title", "body": "My careful <words>.", "version": "1"}
    )

    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert _CONFLICT in page
    assert 'value="My title"' in page and "My careful &lt;words&gt;." in page
    assert 'name="version" type="hidden" value="2"' in page  # saving again overwrites knowingly
    assert stored_posts(app) == [("Their title", "Their body.", "alice", 2)]

    again = client.post(f"/posts/{post_id}/edit", data={"title": "My title", "body": "Mine.", "version": "2"})
    assert again.status_code == 302
    assert stored_posts(app) == [("My title", "Mine.", "alice", 3)]


@pytest.fixture
def rival_saves_before_the_update(app: Flask) -> Iterator[list[int]]:
    """Just before the view flushes its UPDATE (after its version check passed), commit
    another edit of the same post from a second session, as a concurrent save would."""
    rivalled: list[int] = []

    def save_a_rival_edit(session: Any, flush_context: Any, instances: Any) -> None:
        post = next((obj for obj in session.dirty if isinstance(obj, Post)), None)
        if post is None or rivalled:
            return
        rivalled.append(post.id)  # first: the rival's own flush comes through here too
        rival = db.get_session()
        try:
            with rival.begin():
                theirs = rival.get(Post, post.id)
                assert theirs is not None
                theirs.title, theirs.body = "Their title", "Their body."
        finally:
            rival.close()

    event.listen(AppSession, "before_flush", save_a_rival_edit)
    try:
        yield rivalled
    finally:
        event.remove(AppSession, "before_flush", save_a_rival_edit)


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_edit_losing_the_race_in_the_update_is_a_409(
    app: Flask, client: FlaskClient, auth: AuthActions, rival_saves_before_the_update: list[int]
) -> None:
    """The version matched when the view checked it, but the UPDATE's version check
    finds the rival's version (StaleDataError): same 409, nothing overwritten. SQLite
    cannot interleave here (a POST holds the write lock from its first query)."""
    auth.register_and_login()
    post_id = write(client, "Hello", "First post.")
    rival_saves_before_the_update.clear()

    response = client.post(f"/posts/{post_id}/edit", data={"title": "My title", "body": "My body.", "version": "1"})

    assert rival_saves_before_the_update == [post_id]
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert _CONFLICT in page and 'value="My title"' in page and "My body." in page
    assert 'name="version" type="hidden" value="2"' in page
    assert stored_posts(app) == [("Their title", "Their body.", "alice", 2)]


@pytest.mark.parametrize("version", ["", "0", "abc"])
def test_edit_with_a_missing_or_bogus_version_is_a_409(
    app: Flask, client: FlaskClient, auth: AuthActions, version: str
) -> None:
    auth.register_and_login()
    post_id = write(client, "Hello", "First post.")

    response = client.post(f"/posts/{post_id}/edit", data={"title": "New", "body": "New.", "version": version})

    assert response.status_code == 409
    assert stored_posts(app) == [("Hello", "First post.", "alice", 1)]


# -- delete ------------------------------------------------------------------------------


def test_author_deletes(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()
    post_id = write(client)

    response = client.post(f"/posts/{post_id}/delete")

    assert response.status_code == 302
    assert response.headers["Location"] == "/"
    assert "The post is deleted." in client.get("/").get_data(as_text=True)
    assert stored_posts(app) == []
    assert client.get(f"/posts/{post_id}").status_code == 404


def test_others_cannot_delete(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login("alice")
    post_id = write(client)
    auth.logout()
    auth.register_and_login("bob")

    response = client.post(f"/posts/{post_id}/delete")

    assert response.status_code == 403
    assert stored_posts(app) == [("Hello", "First post.", "alice", 1)]


def test_anonymous_delete_goes_to_login(app: Flask, client: FlaskClient) -> None:
    [post_id] = add_posts(app, 1)

    response = client.post(f"/posts/{post_id}/delete")

    assert response.status_code == 302
    assert response.headers["Location"].startswith("/auth/login?next=")
    assert len(stored_posts(app)) == 1


def test_delete_by_get_is_refused(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()
    post_id = write(client)

    response = client.get(f"/posts/{post_id}/delete")

    assert response.status_code == 405
    assert len(stored_posts(app)) == 1


def test_delete_of_missing_post_is_404(client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()

    assert client.post("/posts/1/delete").status_code == 404


# -- escaping ------------------------------------------------------------------------------


def test_markup_in_posts_is_escaped_everywhere(client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login()
    post_id = write(client, "<script>alert(1)</script>", '<img src=x onerror="alert(1)"> "quoted"')

    for path in ("/", f"/posts/{post_id}", "/users/alice", f"/posts/{post_id}/edit"):
        page = client.get(path).get_data(as_text=True)
        assert "<script>alert(1)" not in page, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
        assert "<img src=x" not in page, path


def test_every_write_is_rerun_whole_after_a_certification_failure(
    app: Flask, client: FlaskClient, auth: AuthActions, certification_failures: CertificationFailures
) -> None:
    """Publish, edit and delete each lose their first commit (error 1213, as on Galera)
    and succeed on the retry: one post, one edit, then none; no 5xx."""
    auth.register_and_login()
    certification_failures.next(1)
    post_id = write(client, "Hello", "First post.")
    assert certification_failures.raised == 1
    assert stored_posts(app) == [("Hello", "First post.", "alice", 1)]

    certification_failures.next(1)
    edited = client.post(f"/posts/{post_id}/edit", data={"title": "Again", "body": "Edited.", "version": "1"})
    assert edited.status_code == 302 and certification_failures.raised == 2
    assert stored_posts(app) == [("Again", "Edited.", "alice", 2)]

    certification_failures.next(1)
    assert client.post(f"/posts/{post_id}/delete").status_code == 302
    assert certification_failures.raised == 3
    assert stored_posts(app) == []


def test_negative_control_a_write_that_keeps_losing_certification_is_a_503_that_saved_nothing(
    app: Flask, client: FlaskClient, auth: AuthActions, certification_failures: CertificationFailures
) -> None:
    auth.register_and_login()
    certification_failures.next(3)  # db.retrying() runs a unit at most 3 times
    response = client.post("/posts/new", data={"title": "Hello", "body": "Lost."})
    assert response.status_code == 503
    assert certification_failures.raised == 3
    assert stored_posts(app) == []
