# Development defaults for the `flask` command; .env and the environment override them.
# In production serve with gunicorn (gunicorn.conf.py) and set FLASK_DEBUG=0 for CLI use.
FLASK_APP=myapp
FLASK_DEBUG=1
