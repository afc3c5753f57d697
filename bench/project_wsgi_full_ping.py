"""The bench's myapp with PostgreSQL's pre-ping back to a round trip on every checkout:
the "before" of ``myapp.db.engines._ping_only_when_the_socket_speaks``, measured in the
same run as the "after"."""

from bench.project_wsgi import app
from myapp.db import db

with app.app_context():
    dialect = db.get_engine().dialect
    if "do_ping" in vars(dialect):
        del dialect.do_ping  # back to the dialect's own SELECT-a-round-trip ping
