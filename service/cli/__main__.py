"""``python -m service.cli``: how the server and ``cbam-nas run`` start worker processes."""

from service.cli import app

app()
