"""myapp as ``wsgi.py`` serves it, with the bench config's one change: CSRF off, so
that wrk can POST the create form with a fixed signed session cookie."""

from myapp import create_app

app = create_app({"WTF_CSRF_ENABLED": False})
