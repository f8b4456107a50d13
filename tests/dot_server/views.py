"""The protected resource: DOT itself decides whether the bearer token is valid."""

from django.http import HttpRequest, JsonResponse
from oauth2_provider.decorators import protected_resource


@protected_resource()
def whoami(request: HttpRequest) -> JsonResponse:
    """Who the access token belongs to; DOT answers 403 before this for a bad token."""
    owner = request.resource_owner  # type: ignore[attr-defined]
    return JsonResponse({"user": owner.get_username()})
