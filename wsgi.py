"""WSGI entry point (`gunicorn wsgi:app`): builds the app, nothing else."""

from ipn import create_app

app = create_app()
