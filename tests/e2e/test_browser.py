"""The site in a real browser: headless Chromium against gunicorn, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select

from myapp.db import db
from myapp.models import Post, User
from tests.support.databases import Backend
from tests.support.gunicorn import Server, start_gunicorn, stop_gunicorn
from tests.support.network import free_port

from .conftest import DESKTOP, ROOT, SERVER_ENV, Browser

try:
    from playwright.sync_api import Dialog, Page, Response, expect
except ImportError:  # the fixtures skip (or fail under CI) and say why
    pass

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gunicorn,
    pytest.mark.real_commits,
    pytest.mark.backends("sqlite", "postgresql"),
]

PASSWORD = "correct horse battery"
SCREENSHOT_DIR = ROOT / "build" / "screenshots"
PHONE = {"width": 375, "height": 740}
PER_PAGE = 20
DESKTOP_WIDTH, DESKTOP_HEIGHT = DESKTOP["width"], DESKTOP["height"]


# -- what a person does ---------------------------------------------------------------


def register(page: Page, site: Server, username: str) -> None:
    page.goto(f"{site.url}/auth/register")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Register").click()
    expect(page).to_have_url(f"{site.url}/auth/login")
    expect(page.locator(".flash")).to_contain_text("Your account is ready")


def log_in(page: Page, site: Server, username: str) -> None:
    page.goto(f"{site.url}/auth/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".flash")).to_contain_text(f"Welcome back, {username}.")
    expect(page.locator(".site-header .who")).to_have_text(username)


def log_out(page: Page) -> None:
    page.locator(".site-header").get_by_role("button", name="Log out").click()
    expect(page.locator(".flash")).to_contain_text("You are logged out.")
    expect(page.locator(".site-header .who")).to_have_count(0)
    expect(page.locator(".site-header").get_by_role("link", name="Log in")).to_be_visible()


def write_post(page: Page, title: str, body: str) -> int:
    page.locator(".site-header").get_by_role("link", name="New post").click()
    page.get_by_label("Title").fill(title)
    page.get_by_label("Body").fill(body)
    page.get_by_role("button", name="Publish").click()
    expect(page.locator(".flash")).to_contain_text("Your post is published.")
    expect(page.locator("h1")).to_have_text(title)
    return int(page.url.rsplit("/", 1)[1])


def seed_posts(app: Flask, username: str, count: int) -> None:
    """Older posts written straight into the database: pagination needs more than a page."""
    start = datetime(2024, 1, 1, 9, 0)
    with app.app_context(), db.transaction() as session:
        author = session.scalar(select(User).where(User.username == username))
        assert author is not None
        session.add_all(
            Post(
                title=f"Seeded post {n:02d}",
                body=f"Post number {n} of the seed, written so that the index has pages.",
                author=author,
                created_at=start + timedelta(hours=n),
            )
            for n in range(count)
        )


def stored_posts(app: Flask) -> list[tuple[str, str, int]]:
    """(title, author, version) of every post in the database."""
    with app.app_context():
        rows = db.session.execute(
            select(Post.title, User.username, Post.version).join(Post.author).order_by(Post.id)
        )
        return [(title, username, version) for title, username, version in rows]


def visit(page: Page, url: str) -> Response:
    """Open a URL and return the main response (Playwright types it as optional)."""
    response = page.goto(url)
    assert response is not None, url
    return response


def viewport_width(page: Page) -> int:
    assert page.viewport_size is not None
    return page.viewport_size["width"]


def assert_layout(page: Page) -> None:
    """The page has the site's header and its stylesheet really applied."""
    expect(page.locator(".site-header .brand")).to_have_text("myapp")
    expect(page.locator("main.content")).to_be_visible()
    rules = page.evaluate(
        "[...document.styleSheets].filter(s => (s.href || '').endsWith('/static/style.css'))"
        ".map(s => { try { return s.cssRules.length } catch (e) { return String(e) } })"
    )
    assert len(rules) == 1 and rules[0] > 20, rules
    # Applied, not just loaded: the content column is narrower than the window.
    width = page.evaluate("document.querySelector('main.content').getBoundingClientRect().width")
    assert width < viewport_width(page), width


# -- the tests ------------------------------------------------------------------------


def test_author_journey(site: Server, page: Page, app: Flask) -> None:
    register(page, site, "erin")
    log_in(page, site, "erin")

    post_id = write_post(page, "First light", "Written in a real browser.\nSecond line.")
    expect(page.locator(".post .body")).to_have_text("Written in a real browser.\nSecond line.")

    page.goto(f"{site.url}/")
    first = page.locator("article.post").first
    expect(first.locator("h2")).to_have_text("First light")
    first.get_by_role("link", name="erin").click()
    expect(page).to_have_url(f"{site.url}/users/erin")
    expect(page.locator("h1")).to_have_text("Posts by erin")
    expect(page.locator("article.post h2")).to_have_text(["First light"])

    page.get_by_role("link", name="First light").click()
    page.get_by_role("link", name="Edit").click()
    expect(page).to_have_url(f"{site.url}/posts/{post_id}/edit")
    expect(page.get_by_label("Title")).to_have_value("First light")
    page.get_by_label("Title").fill("First light, revised")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".flash")).to_contain_text("Your changes are saved.")
    expect(page.locator("h1")).to_have_text("First light, revised")
    expect(page.locator(".post .meta")).to_contain_text("edited")
    assert stored_posts(app) == [("First light, revised", "erin", 2)]

    seed_posts(app, "erin", PER_PAGE + 2)  # all older than the browser's post
    page.goto(f"{site.url}/")
    expect(page.locator("article.post")).to_have_count(PER_PAGE)
    expect(page.locator("article.post h2").first).to_have_text("First light, revised")
    pagination = page.locator(".pagination")
    expect(pagination.locator("[rel=prev]")).to_have_count(0)
    pagination.get_by_role("link", name="Older").click()
    expect(page).to_have_url(f"{site.url}/?page=2")
    expect(pagination).to_contain_text("Page 2")
    expect(page.locator("article.post h2")).to_have_text([f"Seeded post {n:02d}" for n in (2, 1, 0)])
    expect(pagination.locator("[rel=next]")).to_have_count(0)
    pagination.get_by_role("link", name="Newer").click()
    expect(page).to_have_url(f"{site.url}/?page=1")
    page.goto(f"{site.url}/users/erin?page=2")
    expect(page.locator("article.post")).to_have_count(3)

    # Deleting asks first (static/confirm.js, allowed by the CSP): "Cancel" keeps the post.
    page.goto(f"{site.url}/posts/{post_id}")
    questions: list[str] = []

    def cancel(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", cancel)
    page.get_by_role("button", name="Delete").click()
    assert questions == ["Delete this post for good?"]
    expect(page).to_have_url(f"{site.url}/posts/{post_id}")
    assert len(stored_posts(app)) == PER_PAGE + 3
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    expect(page).to_have_url(f"{site.url}/")
    expect(page.locator(".flash")).to_contain_text("The post is deleted.")
    expect(page.get_by_text("First light, revised")).to_have_count(0)
    assert [title for title, _, _ in stored_posts(app)] == [f"Seeded post {n:02d}" for n in range(22)]
    assert visit(page, f"{site.url}/posts/{post_id}").status == 404

    log_out(page)
    page.goto(f"{site.url}/posts/new")
    expect(page).to_have_url(f"{site.url}/auth/login?next=/posts/new")


def test_other_user_cannot_edit_or_delete(site: Server, page: Page, app: Flask) -> None:
    register(page, site, "alice")
    log_in(page, site, "alice")
    post_id = write_post(page, "Alice's own words", "Only Alice may change this.")
    expect(page.get_by_role("link", name="Edit")).to_be_visible()
    log_out(page)

    register(page, site, "bob")
    log_in(page, site, "bob")
    page.goto(f"{site.url}/posts/{post_id}")
    expect(page.locator("h1")).to_have_text("Alice's own words")
    expect(page.get_by_role("link", name="Edit")).to_have_count(0)
    expect(page.get_by_role("button", name="Delete")).to_have_count(0)

    assert visit(page, f"{site.url}/posts/{post_id}/edit").status == 403
    expect(page.locator("h1")).to_have_text("Forbidden")
    expect(page.locator(".site-header .who")).to_have_text("bob")
    assert_layout(page)

    # A hand-made request with bob's valid CSRF token: the server still says no.
    token = page.locator(".site-header input[name=csrf_token]").get_attribute("value")
    for action, form in (("edit", {"title": "Bob was here", "body": "x"}), ("delete", {})):
        forged = page.request.post(
            f"{site.url}/posts/{post_id}/{action}", form={"csrf_token": token or "", **form}
        )
        assert forged.status == 403, action
    assert stored_posts(app) == [("Alice's own words", "alice", 1)]


def test_form_without_csrf_token_fails_cleanly(site: Server, page: Page, app: Flask) -> None:
    register(page, site, "carol")
    log_in(page, site, "carol")

    for tamper in ("node => node.remove()", "node => { node.value = 'forged' }"):
        page.goto(f"{site.url}/posts/new")
        page.get_by_label("Title").fill("Never saved")
        page.get_by_label("Body").fill("The token was tampered with.")
        page.locator("form.form input[name=csrf_token]").evaluate(tamper)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.get_by_role("button", name="Publish").click()
        assert answer.value.status == 400, tamper
        expect(page.locator("h1")).to_have_text("Bad request")
        assert_layout(page)
        # The refusal page still knows who is logged in (the user loads before the check).
        expect(page.locator(".site-header .who")).to_have_text("carol")
    assert stored_posts(app) == []

    # Logging out is a state change too: without the token it is refused.
    page.goto(f"{site.url}/")
    page.locator(".site-header input[name=csrf_token]").evaluate("node => node.remove()")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.locator(".site-header").get_by_role("button", name="Log out").click()
    assert answer.value.status == 400
    expect(page.locator("h1")).to_have_text("Bad request")
    page.goto(f"{site.url}/")
    expect(page.locator(".site-header .who")).to_have_text("carol")


def test_not_found_pages_have_the_layout(site: Server, page: Page) -> None:
    for path, message in (
        ("/posts/987654", "Post 987654 does not exist."),
        ("/users/nobody-here", "No such user."),
        ("/no/such/page", "There is nothing at this address."),
        ("/?page=999", "There is nothing at this address."),
    ):
        assert visit(page, site.url + path).status == 404, path
        expect(page.locator("h1")).to_have_text("Not found")
        expect(page.locator("main")).to_contain_text(message)
        expect(page).to_have_title("Not found · myapp")
        assert_layout(page)
        page.get_by_role("link", name="Back to the latest posts").click()
        expect(page).to_have_url(f"{site.url}/")


def _unreachable_database(backend: Backend, tmp_path: Path) -> str:
    if backend.is_sqlite:
        return f"sqlite:///{tmp_path / 'no-such-directory' / 'db.sqlite'}"
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"


def test_database_down_gives_503_page_with_layout(
    site: Server, page: Page, backend: Backend, tmp_path: Path
) -> None:
    # Logged in first: the session cookie reaches the down server too (cookies ignore
    # the port), so its pages must render, styled, without loading the user.
    register(page, site, "dave")
    log_in(page, site, "dave")
    logs = tmp_path / "down"
    logs.mkdir()
    down = start_gunicorn(_unreachable_database(backend, tmp_path), logs, **SERVER_ENV)
    try:
        for path in ("/", "/posts/1", "/users/dave"):
            response = visit(page, down.url + path)
            assert response.status == 503, path
            assert response.headers.get("retry-after") == "5"
            expect(page.locator("h1")).to_have_text("Temporarily unavailable")
            expect(page.locator("main")).to_contain_text("The database cannot be reached right now.")
            assert_layout(page)
        assert visit(page, down.url + "/healthz").status == 200
    finally:
        stop_gunicorn(down)
    assert "Traceback" not in down.log_text()
    # The same browser on the healthy server: the site is unaffected.
    assert visit(page, f"{site.url}/").status == 200
    expect(page.locator("h1")).to_have_text("Latest posts")


def _no_inline_code(page: Page) -> None:
    """No inline script, <style> or style="" that a strict Content-Security-Policy would block."""
    inline = page.evaluate(
        "document.querySelectorAll('script:not([src]), style, [style], [onclick], [onsubmit]').length"
    )
    assert inline == 0, page.url


def _fits_the_screen(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport_width(page), f"{page.url} is {width}px wide"


def _shoot(page: Page, name: str) -> None:
    _no_inline_code(page)
    _fits_the_screen(page)
    page.screenshot(path=SCREENSHOT_DIR / f"{name}.png", full_page=True)


def test_screenshots_of_the_main_pages(site: Server, browser: Browser, app: Flask) -> None:
    """Write the pages to build/screenshots/ for review, checking each fits and has no inline code."""
    page = browser.page
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)

    page.goto(f"{site.url}/auth/register")
    page.get_by_label("Username").fill("x!")
    page.get_by_label("Password", exact=True).fill("short")
    page.get_by_role("button", name="Register").click()
    expect(page.locator(".field:has(#username) .field-error").first).to_be_visible()
    expect(page.locator(".field:has(#password) .field-error")).to_contain_text("characters")
    _shoot(page, "register-with-errors")

    register(page, site, "grace")
    log_in(page, site, "grace")
    seed_posts(app, "grace", PER_PAGE)
    post_id = write_post(
        page,
        "Notes from a real browser",
        "Every page here is served by gunicorn and rendered by Chromium.\n\n"
        "This paragraph is long enough to wrap on a phone, so that the screenshot shows how "
        "body text flows in the card, and a_very_long_unbroken_word_that_must_wrap_instead_of_"
        "overflowing_the_screen_on_a_small_phone.",
    )
    _shoot(page, "post")

    # The checks below mean something only under a Content-Security-Policy.
    assert "content-security-policy" in visit(page, f"{site.url}/").headers
    expect(page.locator(".pagination")).to_be_visible()
    _shoot(page, "index")

    page.goto(f"{site.url}/posts/new")
    page.get_by_role("button", name="Publish").click()
    expect(page.locator(".field:has(#title) .field-error")).to_have_text("This field is required.")
    expect(page.locator(".field:has(#body) .field-error")).to_have_text("This field is required.")
    _shoot(page, "form-with-errors")

    page.goto(f"{site.url}/posts/{post_id}/edit")
    _shoot(page, "edit")

    page.goto(f"{site.url}/posts/987654")
    _shoot(page, "error-404")

    page.set_viewport_size(PHONE)
    for name, path in (("index", "/"), ("post", f"/posts/{post_id}"), ("form", "/posts/new")):
        page.goto(site.url + path)
        _shoot(page, f"phone-{name}")
    log_out(page)
    _shoot(page, "phone-logged-out")
    page.goto(f"{site.url}/auth/login")
    _shoot(page, "phone-login")

    page.emulate_media(color_scheme="dark")
    page.goto(f"{site.url}/")
    _shoot(page, "phone-index-dark")

    assert browser.csp_violations() == []
    for name in ("index", "post", "form-with-errors", "error-404", "phone-index"):
        assert (SCREENSHOT_DIR / f"{name}.png").stat().st_size > 10_000, name
