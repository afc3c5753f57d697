"""What a public site needs beyond its views: security headers on every response, the
client's real address and scheme behind a proxy, and a session cookie that is Secure
over HTTPS. (Login attempts are limited in ``login_limits``.)"""

from __future__ import annotations

from typing import Any

from flask import Flask, has_request_context, request
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

# No inline script or style anywhere: the templates link their CSS and JS files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # for browsers that predate frame-ancestors
    # Not "no-referrer": Flask-WTF checks the Referer of HTTPS form posts.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# A JSON body (the probes' answers) is data, not a page: no script, link, form or window
# of its own, so only what still applies to data (OWASP's headers for REST answers):
# never sniffed as HTML, never framed. Each header costs gunicorn a little on every
# response, and /healthz is the cheapest route there is.
DATA_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
STRICT_TRANSPORT_SECURITY = "max-age=31536000"  # sent over HTTPS only
_SERIALIZER_KEY = "myapp.session_serializer"  # in app.extensions: (what it was built from, serializer)

def init_headers(app: Flask) -> None:
    """Call first in ``create_app``, before any other after_request hook is registered.

    Flask runs after_request functions in the reverse order of their registration, so
    the first one registered runs last: a response that a later-registered hook
    replaced (the error page of a failed DATABASE_COMMIT_ON_SUCCESS commit) still gets
    the headers.
    """
    app.after_request(add_security_headers)


def init_app(app: Flask) -> None:
    _trust_proxy(app)
    app.session_interface = HttpsAwareSessionInterface()


# -- headers, proxy, cookie ----------------------------------------------------------


def add_security_headers(response: Response) -> Response:
    """Runs for every response, error pages and static files included: all of
    SECURITY_HEADERS, but only DATA_SECURITY_HEADERS on a JSON answer."""
    wanted = DATA_SECURITY_HEADERS if response.mimetype == "application/json" else SECURITY_HEADERS
    # One pass over the headers instead of a case-insensitive scan per setdefault():
    # this runs on every response, so its cost shows on the cheapest routes.
    present = {name.lower() for name, _ in response.headers}
    for name, value in wanted.items():
        if name.lower() not in present:
            response.headers.add(name, value)
    if has_request_context() and request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", STRICT_TRANSPORT_SECURITY)
    return response


def _trust_proxy(app: Flask) -> None:
    """Believe X-Forwarded-* only as far as PROXY_FIX_X_* says a proxy sets them;
    otherwise anyone could pick their own address (and rate-limit bucket) or scheme."""
    hops = {name: int(app.config[f"PROXY_FIX_X_{name.upper()}"]) for name in ("for", "proto", "host", "port", "prefix")}
    if any(hops.values()):
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=hops["for"],
            x_proto=hops["proto"],
            x_host=hops["host"],
            x_port=hops["port"],
            x_prefix=hops["prefix"],
        )


class HttpsAwareSessionInterface(SecureCookieSessionInterface):
    """The session cookie is Secure when SESSION_COOKIE_SECURE says so, and also
    whenever the request itself came over HTTPS (directly or through a trusted proxy),
    so that a site served over HTTPS never sends it in clear by a forgotten setting."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return super().get_cookie_secure(app) or (has_request_context() and request.is_secure)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        """Flask builds a new serializer on every request, to open the session even when
        no cookie came (itsdangerous then checks its JSON serializer by dumping ``{}``):
        the largest cost of a request that never reads the session. Built once per app,
        and again whenever the secret key or its fallbacks change."""
        made_from = (self, app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        cached: tuple[Any, URLSafeTimedSerializer | None] | None = app.extensions.get(_SERIALIZER_KEY)
        if cached is None or cached[0] != made_from:
            cached = app.extensions[_SERIALIZER_KEY] = (made_from, super().get_signing_serializer(app))
        return cached[1]
