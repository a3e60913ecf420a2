from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from uploads.api import UploadViewSet
from uploads.tus import UPLOAD_URL_NAME, TusCreateView, TusUploadView
from uploads.views import UploadPageView, upload_form

# "/?": clients that drop the trailing slash get the same endpoint, not a redirect they won't follow.
# Set after construction: DefaultRouter.__init__ turns any truthy `trailing_slash` into "/".
router = DefaultRouter()
router.trailing_slash = "/?"
router.register("uploads", UploadViewSet, basename="upload")

# Unmatched URLs under /api/ answer JSON like the API's own 404s.
handler404 = "uploads.api.not_found"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/", include(router.urls)),
    # tus 1.0.0. With and without a trailing slash: clients do not follow APPEND_SLASH redirects.
    re_path(r"^files/?$", TusCreateView.as_view(), name="tus-create"),
    # Any id, not only UUIDs: an unknown one is then a tus 404 (with Tus-Resumable), not Django's page.
    re_path(r"^files/(?P<pk>[^/]+)/?$", TusUploadView.as_view(), name=UPLOAD_URL_NAME),
    path("accounts/", include("django.contrib.auth.urls")),
    path("upload/", upload_form, name="upload-form"),  # the page's form without JavaScript
    path("", UploadPageView.as_view(), name="upload-page"),
]
