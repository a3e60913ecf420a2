"""Browser-facing views of the uploads app.

Only the upload page lives here; the REST API that the page talks to is
implemented separately (DRF viewset registered with basename "upload").
"""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.urls import reverse
from django.views.generic import TemplateView

from uploads.conf import conf


class UploadPageView(LoginRequiredMixin, TemplateView):
    """The drag-and-drop upload page.

    All the work happens in the browser (uploads/static/uploads/uploader.js);
    the view only hands the client the limits it must respect and where the
    API lives, so that the JS never hard-codes server settings or URLs.
    """

    template_name = "uploads/index.html"

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context["max_size"] = conf.MAX_SIZE
        # Serialised with |json_script in the template: safe against injection and read by
        # uploader.js with a single JSON.parse.
        context["config"] = {
            "chunkSize": conf.CHUNK_SIZE,
            "maxSize": conf.MAX_SIZE,
            "apiUrl": reverse("upload-list"),
        }
        return context
