"""gunicorn settings for a checkout: those of the package, ``myapp/gunicorn_conf.py``.

Run migrations first, as their own step: `flask db upgrade && gunicorn -c gunicorn.conf.py wsgi:app`.
Installed from a wheel there is no checkout: see README.md, "Deploying from a wheel"
(`gunicorn -c python:myapp.gunicorn_conf 'myapp:create_app()'`).
"""

from dotenv import load_dotenv

# The .env next to this file, as before; the package's settings then add the working
# folder's, without overriding anything already set.
load_dotenv()

from myapp.gunicorn_conf import *  # noqa: E402,F401,F403
