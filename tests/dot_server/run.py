"""``python -m tests.dot_server.run --port 0 --db PATH``: serve DOT on 127.0.0.1.

Creates the schema, the test user and the public client in a fresh SQLite file, then serves
the Django app with wsgiref, one request at a time (so SQLite never sees two writers and the
order of refreshes is the order of arrival). The first stdout line is the base URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

from . import CLIENT_ID, PASSWORD, USERNAME

__all__ = ["main"]


class _QuietHandler(WSGIRequestHandler):
    """No access log: the test reads the server's answers, not its chatter."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def _bootstrap() -> None:
    """The schema, the resource owner and the public client (idempotent)."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from oauth2_provider.models import get_application_model

    call_command("migrate", verbosity=0, interactive=False)
    user_model = get_user_model()
    user = user_model.objects.filter(username=USERNAME).first()
    if user is None:
        user = user_model.objects.create_user(USERNAME, password=PASSWORD)
    application = get_application_model()
    application.objects.update_or_create(
        client_id=CLIENT_ID,
        defaults={
            "name": "aac-tokend integration test",
            "user": user,
            "client_type": application.CLIENT_PUBLIC,
            "authorization_grant_type": application.GRANT_PASSWORD,
            "client_secret": "",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.dot_server.run")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--db", required=True, help="SQLite file (created if missing)")
    parser.add_argument("--access-ttl", type=int, default=5, help="access token lifetime (s)")
    args = parser.parse_args(argv)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.dot_server.settings"
    os.environ["DOT_SERVER_DB"] = args.db
    os.environ["DOT_SERVER_ACCESS_TTL"] = str(args.access_ttl)
    import django
    from django.core.wsgi import get_wsgi_application

    django.setup()
    _bootstrap()
    server = make_server(
        "127.0.0.1", args.port, get_wsgi_application(), handler_class=_QuietHandler
    )
    print(f"http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
