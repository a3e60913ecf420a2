"""The admin: a read-only window on uploads, plus abort and delete through the services.

Three rules shape it:
- The admin never writes an upload itself. A change form's `save()` would write back every column
  as read at the start of the request, over any chunk committed meanwhile (RELIABILITY.md E7), so
  adding and changing are refused and the change page is a read-only detail page. Abort and delete
  go through `services`, which take the upload's lock and remove its files.
- The list renders from the database. Redis totals are display-only and fetched with one MGET per
  page (`progress.read_many`), never one call per row, so a dead Redis costs one bounded timeout
  and the page still renders (RELIABILITY.md N1).
- File names are user input: every column that builds HTML uses `format_html` (RELIABILITY.md J6).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import ngettext

from . import http as http_body
from . import progress, selectors, services
from .exceptions import DataLost, UploadBusy, UploadError
from .models import Status, UploadSession

NO_VALUE = "—"
# Where the page's Redis totals are kept on each row instance between `get_changelist_instance`
# (one MGET) and the column callables, which only receive the row.
REDIS_TOTAL_ATTR = "_admin_redis_total"


def _attach_redis_totals(uploads: Iterable[UploadSession]) -> None:
    """Fetch the Redis totals of `uploads` in one MGET and remember each on its row."""
    uploads = list(uploads)
    totals = progress.read_many(uploads)  # {} when Redis is down: the page still renders
    for upload in uploads:
        setattr(upload, REDIS_TOTAL_ATTR, totals.get(upload.pk))


def _bytes(value: int) -> SafeString:
    # Human units for reading, the exact count on hover for comparing with logs and Redis.
    return format_html('<span title="{} bytes">{}</span>', value, filesizeformat(value))


def _percent_text(upload: UploadSession) -> str | None:
    """One decimal, rounded down in integers: 99.96% of a partial upload reads 99.9%, never 100.0%."""
    if upload.size is None:
        return None  # a tus client deferred the length: there is no whole to measure against
    tenths = 1000 if upload.size == 0 else upload.offset * 1000 // upload.size
    return f"{tenths // 10}.{tenths % 10}%"


@admin.register(UploadSession)
class UploadSessionAdmin(admin.ModelAdmin):
    list_display = (
        "filename",
        "owner",
        "shown_status",
        "protocol",
        "progress_bar",
        "received",
        "redis_total",
        "last_activity",
        "expires",
    )
    list_filter = ("status", "protocol", ("owner", admin.RelatedOnlyFieldListFilter))
    search_fields = ("filename", "owner__username")
    date_hierarchy = "created_at"
    list_select_related = ("owner",)
    empty_value_display = NO_VALUE
    # The method named `delete_selected` replaces Django's site-wide action of that name, which
    # deletes rows with a bulk DELETE and leaves their files behind.
    actions = ("abort_selected", "delete_selected")
    fieldsets = (
        (None, {"fields": ("id", "owner", "filename", "status", "error", "download")}),
        ("Protocol", {"fields": ("protocol", "tus_metadata", "tus_concat")}),
        ("Progress", {"fields": ("progress_bar", "received", "redis_total", "offset", "size")}),
        ("Integrity", {"fields": ("checksum", "sha256", "file")}),
        ("Timestamps", {"fields": ("created_at", "updated_at", "completed_at", "expires_at")}),
    )

    # --- Read-only by construction ------------------------------------------------------------

    def get_readonly_fields(self, request: HttpRequest, obj: UploadSession | None = None) -> list[str]:
        # Every model field, including any added later, plus the computed ones.
        computed = ["progress_bar", "received", "redis_total", "download"]
        return [field.name for field in self.opts.fields] + computed

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # uploads are created by the API, with a partial file behind each row

    def has_change_permission(self, request: HttpRequest, obj: UploadSession | None = None) -> bool:
        # Refusing "change" makes Django render a view-only page and answer 403 to any POST of the
        # change form, so no admin request can `save()` a stale offset (E7).
        return False

    def has_abort_permission(self, request: HttpRequest) -> bool:
        # Aborting changes an upload: it needs the real "change" permission that the method above
        # hides from the change form.
        codename = get_permission_codename("change", self.opts)
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    def save_model(self, request: HttpRequest, obj: UploadSession, form: ModelForm, change: bool) -> None:
        # Unreachable while add and change are refused; if that ever changes, fail loudly rather
        # than write a stale row (E7).
        raise PermissionDenied("Uploads are changed only through the upload services.")

    # --- Redis totals: one MGET per page ---------------------------------------------------------

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        changelist = super().get_changelist_instance(request)
        # Evaluating `result_list` here fills its result cache, so the template renders these very
        # instances, each already carrying its total.
        _attach_redis_totals(changelist.result_list)
        return changelist

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> UploadSession | None:
        upload = super().get_object(request, object_id, from_field)
        if upload is not None:
            _attach_redis_totals([upload])
        return upload

    # --- Columns ---------------------------------------------------------------------------------

    @admin.display(description="Status", ordering="status")
    def shown_status(self, upload: UploadSession) -> str:
        # What clients are told: an idle partial past its expiry is expired before cleanup runs.
        return Status(selectors.upload_effective_status(upload)).label

    @admin.display(description="Progress")
    def progress_bar(self, upload: UploadSession) -> SafeString:
        percent = _percent_text(upload)
        if percent is None:
            return format_html('<progress style="width: 8em; vertical-align: middle"></progress> {}', "size unknown")
        return format_html(
            '<progress value="{}" max="100" style="width: 8em; vertical-align: middle">{}</progress> {}',
            percent.rstrip("%"),
            percent,
            percent,
        )

    @admin.display(description="Received / size", ordering="offset")
    def received(self, upload: UploadSession) -> SafeString:
        if upload.size is None:
            return format_html("{} / {}", _bytes(upload.offset), "size not yet declared")
        return format_html("{} / {}", _bytes(upload.offset), _bytes(upload.size))

    @admin.display(description="Redis total")
    def redis_total(self, upload: UploadSession) -> SafeString | str:
        # Only the total fetched for the whole page; never a Redis call from here (N1).
        total = getattr(upload, REDIS_TOTAL_ATTR, None)
        if total is None:
            return NO_VALUE
        if total > upload.offset:
            # The cache must trail the database (INV3); show a broken promise instead of hiding it.
            return format_html(
                '{} <span title="Ahead of the database, which is the truth">⚠</span>', _bytes(total)
            )
        return _bytes(total)

    @admin.display(description="Last activity", ordering="updated_at")
    def last_activity(self, upload: UploadSession) -> Any:
        return upload.updated_at

    @admin.display(description="Expires", ordering="expires_at")
    def expires(self, upload: UploadSession) -> Any:
        return upload.expires_at

    @admin.display(description="Download")
    def download(self, upload: UploadSession) -> SafeString | str:
        if upload.status != Status.COMPLETE:
            return NO_VALUE
        url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_download", args=[upload.pk])
        return format_html('<a href="{}">{}</a> ({})', url, upload.filename, filesizeformat(upload.size))

    # --- Download -------------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        info = (self.opts.app_label, self.opts.model_name)
        return [
            # Before the default patterns: their `<path:object_id>/` catch-all would swallow it.
            path(
                "<path:object_id>/download/",
                self.admin_site.admin_view(self.download_view),
                name="%s_%s_download" % info,
            ),
            *super().get_urls(),
        ]

    def download_view(self, request: HttpRequest, object_id: str) -> FileResponse:
        """A completed file for staff. The API's download only serves the owner (K1), so the
        admin has its own, with the same headers."""
        # The plain lookup: a download has no use for the Redis total our `get_object` adds.
        upload = super().get_object(request, object_id)
        if upload is None or upload.status != Status.COMPLETE:
            raise Http404("No completed upload with this id.")
        if not self.has_view_permission(request, upload):
            raise PermissionDenied
        try:
            # The same response as the API's: user content is never rendered, not even for staff.
            return http_body.download_response(upload)
        except DataLost as exc:
            raise Http404(exc.detail) from exc

    # --- Actions and deletion, all through the services -------------------------------------------

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        # The admin site's own `delete_selected` must never come back (e.g. when ours is filtered
        # out for lack of permission and the site's is not): it would leave files behind.
        if "delete_selected" in actions and actions["delete_selected"][0] is django_delete_selected:
            del actions["delete_selected"]
        return actions

    @admin.action(permissions=["abort"], description="Abort selected unfinished uploads")
    def abort_selected(self, request: HttpRequest, queryset: QuerySet[UploadSession]) -> None:
        reason = f"Aborted by {request.user.get_username()}."
        aborted = skipped = 0
        failures: list[UploadError] = []
        for upload in queryset:
            if upload.status != Status.PARTIAL:
                skipped += 1
                continue
            try:
                services.upload_abort(upload=upload, reason=reason)
            except UploadError as exc:
                failures.append(exc)
                continue
            # It may have completed between the list and the lock; then it was left as it is.
            if upload.status == Status.FAILED:
                aborted += 1
            else:
                skipped += 1
        if aborted:
            self.message_user(
                request,
                ngettext(
                    "Aborted %d upload and deleted its partial file.",
                    "Aborted %d uploads and deleted their partial files.",
                    aborted,
                )
                % aborted,
                messages.SUCCESS,
            )
        if skipped:
            self.message_user(
                request,
                ngettext(
                    "Skipped %d upload that was not unfinished.",
                    "Skipped %d uploads that were not unfinished.",
                    skipped,
                )
                % skipped,
                messages.INFO,
            )
        self._report_failures(request, failures, verb="abort")

    @admin.action(permissions=["delete"], description="Delete selected uploads and their files")
    def delete_selected(self, request: HttpRequest, queryset: QuerySet[UploadSession]) -> HttpResponse | None:
        if not request.POST.get("post"):
            # Django's confirmation page; its form posts back to the action named "delete_selected",
            # which is this one, with `post=yes`.
            return django_delete_selected(self, request, queryset)
        deleted = self._delete_uploads(request, queryset)
        if deleted:
            self.message_user(
                request,
                ngettext(
                    "Deleted %d upload and its file.", "Deleted %d uploads and their files.", deleted
                )
                % deleted,
                messages.SUCCESS,
            )
        return None

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[UploadSession]) -> None:
        # Never `queryset.delete()`: a bulk DELETE skips the lock and leaves the files.
        self._delete_uploads(request, queryset)

    def delete_model(self, request: HttpRequest, obj: UploadSession) -> None:
        # UploadBusy propagates so that `delete_view` rolls back its log entry and reports it.
        services.upload_delete(upload=obj)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except UploadError as exc:
            self._report_failures(request, [exc], verb="delete")
            return HttpResponseRedirect(
                reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[object_id])
            )

    def _delete_uploads(self, request: HttpRequest, queryset: QuerySet[UploadSession]) -> int:
        deleted = 0
        failures: list[UploadError] = []
        for upload in queryset:
            try:
                services.upload_delete(upload=upload)
            except UploadError as exc:
                failures.append(exc)
                continue
            # Logged after the fact, so the history never records a deletion that a lock refused;
            # the instance keeps its pk because the service deletes by query.
            self.log_deletions(request, [upload])
            deleted += 1
        self._report_failures(request, failures, verb="delete")
        return deleted

    def _report_failures(self, request: HttpRequest, failures: Sequence[UploadError], *, verb: str) -> None:
        """A warning, not a crash: a locked upload (423) is routine while a chunk is arriving."""
        busy = sum(isinstance(exc, UploadBusy) for exc in failures)
        if busy:
            self.message_user(
                request,
                ngettext(
                    "Could not %(verb)s %(count)d upload: a request is writing to it; try again shortly.",
                    "Could not %(verb)s %(count)d uploads: requests are writing to them; try again shortly.",
                    busy,
                )
                % {"verb": verb, "count": busy},
                messages.WARNING,
            )
        for exc in failures:
            if not isinstance(exc, UploadBusy):
                self.message_user(request, f"Could not {verb} an upload: {exc.detail}", messages.WARNING)
