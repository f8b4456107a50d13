"""Routes: DOT's endpoints under /o/ and one protected view."""

from django.urls import include, path

from . import PROTECTED_PATH
from .views import whoami

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path(PROTECTED_PATH.lstrip("/"), whoami),
]
