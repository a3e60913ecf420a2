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
        chunk_size = conf.CHUNK_SIZE
        max_size = conf.MAX_SIZE
        api_url = reverse("upload-list")
        context.update(
            chunk_size=chunk_size,
            max_size=max_size,
            api_url=api_url,
            # Serialised with |json_script in the template: safe against
            # injection and read by uploader.js with a single JSON.parse.
            config={
                "chunkSize": chunk_size,
                "maxSize": max_size,
                "apiUrl": api_url,
            },
        )
        return context
