"""Entry module for `celery -A workers.main worker|beat`: builds the app, nothing else."""

from ipn import create_app

app = create_app()
celery = app.extensions["celery"]
