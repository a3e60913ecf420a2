"""Expire idle partial uploads and delete orphaned partial files. Run it from cron, e.g. hourly."""
from django.core.management.base import BaseCommand

from uploads import services
from uploads.conf import conf


class Command(BaseCommand):
    help = (
        "Expire partial uploads idle longer than UPLOADS_EXPIRY (their data is deleted, the row "
        "stays as 'expired' so clients get 410) and delete partial files no unfinished upload owns. "
        "Completed uploads are never touched."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only list what would be removed.")

    def handle(self, *args, dry_run: bool = False, **options) -> None:
        report = services.uploads_cleanup(dry_run=dry_run)
        verb = "Would expire" if dry_run else "Expired"
        for upload in report.expired:
            self.stdout.write(f"{verb} {upload.pk} {upload.filename!r} ({upload.offset}/{upload.size} bytes)")
        for upload in report.skipped_busy:
            self.stdout.write(f"Skipped {upload.pk}: a request is writing to it")
        for path in report.orphaned_files:
            self.stdout.write(f"{'Would delete' if dry_run else 'Deleted'} orphaned file {path}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} {len(report.expired)} upload(s), "
                f"{'would delete' if dry_run else 'deleted'} {len(report.orphaned_files)} orphaned file(s), "
                f"skipped {len(report.skipped_busy)} busy (expiry window {conf.EXPIRY})."
            )
        )
