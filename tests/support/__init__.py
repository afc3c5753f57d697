"""Helpers that test modules, fixtures, the topologies and scripts import by name.

``tests/conftest.py`` holds fixtures and hooks only; whatever a test module needs to
call (an app factory, a throwaway database, a gunicorn server, a query counter) lives
in a module here named for what it holds, and is imported from that module.
"""
