from django.apps import AppConfig


class UploadsConfig(AppConfig):
    name = "uploads"
    verbose_name = "Resumable uploads"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import signals

        from . import checks, progress  # noqa: F401  (importing checks registers the system checks)

        # The last total a request commits is written to Redis after its response (progress.py).
        signals.request_started.connect(progress.request_started, dispatch_uid="uploads.progress.started")
        signals.request_finished.connect(progress.request_finished, dispatch_uid="uploads.progress.finished")
