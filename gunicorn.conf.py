"""Read by gunicorn from the working directory when no --config is given: the same settings as
the Procfile's `--config python:ipn.gunicorn_config`, so a bare `gunicorn wsgi:app` gets the
gevent workers and the one-line refusal of bad configuration too."""

from ipn.gunicorn_config import *  # noqa: F403
