"""A tiny Django OAuth Toolkit server for integration tests: an independent OAuth 2.0 server.

Importing this package does not import Django; ``run`` configures and starts it in its own
process. The constants name what ``run`` creates, so tests can ask it for a token pair.
"""

__all__ = ["CLIENT_ID", "PASSWORD", "PROTECTED_PATH", "TOKEN_PATH", "USERNAME"]

#: A public client (no secret), like AAC's: it may use the password and refresh grants.
CLIENT_ID = "aac-tokend-it"
#: The resource owner the password grant logs in; a throw-away test account.
USERNAME = "alice"
PASSWORD = "alice-test-password"
#: DOT's token endpoint keeps Django's trailing slash.
TOKEN_PATH = "/o/token/"
#: A view that answers 200 only to a valid access token (DOT's ``protected_resource``).
PROTECTED_PATH = "/api/whoami"
