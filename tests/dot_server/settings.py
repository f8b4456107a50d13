"""Django settings of the test server: the least a DOT token endpoint and one view need."""

import os

SECRET_KEY = "dot-server-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "oauth2_provider"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.dot_server.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DOT_SERVER_DB"],
        # One request at a time is served, but a slow disk must not fail a write at once.
        "OPTIONS": {"timeout": 20},
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The default PBKDF2 costs about a second per hash on this machine; a test account needs none.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "oauth2_provider": {"handlers": ["stderr"], "level": "WARNING"},
        "django.request": {"handlers": ["stderr"], "level": "ERROR"},
    },
}

OAUTH2_PROVIDER = {
    # What AAC does: every refresh returns a new refresh token and spends the old one ...
    "ROTATE_REFRESH_TOKEN": True,
    # ... and presenting a spent one revokes the whole family (every token of the chain).
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    # No window in which a spent refresh token is still honoured: reuse is reuse at once.
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    # Short enough that the daemon refreshes every few seconds during a test.
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("DOT_SERVER_ACCESS_TTL", "5")),
    "SCOPES": {"read": "Read", "write": "Write"},
}
