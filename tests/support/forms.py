"""Fill in the site's forms over HTTP, CSRF token included, as a browser would."""

from __future__ import annotations

import re

import requests


def csrf_token(page: str) -> str:
    """The CSRF token of a rendered page: a Flask-WTF form field (``form.csrf_token``)
    or a hand-written hidden input (the logout and delete buttons)."""
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        r'name="csrf_token" value="([^"]+)"', page
    )
    assert match, "no CSRF token in the page"
    return match.group(1)


def post_form(browser: requests.Session, url: str, **fields: str) -> requests.Response:
    """GET the form at ``url`` for its token, then POST ``fields`` with it, unredirected."""
    token = csrf_token(browser.get(url, timeout=10).text)
    return browser.post(url, data={"csrf_token": token, **fields}, timeout=10, allow_redirects=False)
