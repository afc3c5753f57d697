"""The benchmark suite: myapp against bare Flask, Flask-SQLAlchemy, the Flask docs'
``scoped_session`` pattern and hand-written psycopg (``make bench``)."""
