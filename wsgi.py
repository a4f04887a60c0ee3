"""WSGI entry point (`gunicorn wsgi:app`): builds the app, nothing else."""

from ipn import create_app
from ipn.config import settings_or_exit

app = create_app(settings_or_exit())
