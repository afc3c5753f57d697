"""Register, log in and out through the site's own forms, as flaskr's tests do."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient


class AuthActions:
    """The auth forms of one test client; the defaults make a valid user."""

    def __init__(self, client: FlaskClient) -> None:
        self._client = client

    def register(self, username: str = "alice", password: str = "correct horse") -> Any:
        return self._client.post("/auth/register", data={"username": username, "password": password})

    def login(self, username: str = "alice", password: str = "correct horse") -> Any:
        return self._client.post("/auth/login", data={"username": username, "password": password})

    def register_and_login(self, username: str = "alice", password: str = "correct horse") -> None:
        """Both, asserting each redirects: the set-up of a test that needs a user."""
        assert self.register(username, password).status_code == 302
        assert self.login(username, password).status_code == 302

    def logout(self) -> Any:
        return self._client.post("/auth/logout")
