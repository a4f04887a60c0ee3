"""Entry module for `celery -A workers.main worker|beat`: builds the app, nothing else."""

from ipn import create_app
from ipn.config import settings_or_exit, warn_if_lax

settings = settings_or_exit()
warn_if_lax(settings)
# Not named `app`: Celery's -A would take that for its own app.
flask_app = create_app(settings)
celery = flask_app.extensions["celery"]
