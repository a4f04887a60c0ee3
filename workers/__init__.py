"""The Celery side: the app factory (`workers.app`), the tasks (`workers.tasks`), and the entry
module the worker and beat processes load (`workers.main`)."""
