"""Alembic's script folder, installed as the package ``myapp.migrations``.

setup.cfg maps this folder into the package (``package_dir``), so a wheel carries the
migrations and ``flask db`` finds them through the package wherever it is installed.
Alembic runs ``env.py`` and the revisions itself; nothing imports this package.
"""
