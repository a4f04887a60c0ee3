"""Read by gunicorn from the working directory before it starts: bad configuration stops it with
one line naming the variable, before a worker boots and fails with a traceback."""

from ipn.config import settings_or_exit

settings_or_exit()
