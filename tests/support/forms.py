"""Fill in the site's forms over HTTP, CSRF token included, and read back what a page
holds in them, as a browser would."""

from __future__ import annotations

import re
from html.parser import HTMLParser

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


class Textareas(HTMLParser):
    """The textareas of a page as a browser reads them: by name, with the one newline
    right after the start tag dropped, as HTML says."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.values: dict[str, str] = {}
        self._name: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "textarea":
            self._name = dict(attrs)["name"]
            self.values[self._name or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea" and self._name is not None:
            self.values[self._name] = self.values[self._name].removeprefix("\n")
            self._name = None

    def handle_data(self, data: str) -> None:
        if self._name is not None:
            self.values[self._name] += data


def textareas(page: str) -> dict[str, str]:
    """What each textarea of ``page`` would send, by name (``Textareas``)."""
    parser = Textareas()
    parser.feed(page)
    parser.close()
    return parser.values
