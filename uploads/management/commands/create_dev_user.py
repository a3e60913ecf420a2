"""Create the local development account once and print its credentials (used by `make run`)."""
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "In DEBUG, create a superuser for local use and print its password and API token once."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument(
            "--credentials-file",
            default=str(Path(settings.BASE_DIR) / ".dev-credentials"),
            help="Where the credentials are also written (git-ignored), so they can be looked up later.",
        )

    def handle(self, *args, username: str, credentials_file: str, **options) -> None:
        if not settings.DEBUG:
            raise CommandError("Refusing to create a development account with DEBUG off.")
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            path = Path(credentials_file)
            hint = f" (see {path})" if path.exists() else ""
            self.stdout.write(f"Development account {username!r} already exists{hint}.")
            return
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser(username=username, email="", password=password)
        token = Token.objects.create(user=user)
        text = (
            f"Log in at http://127.0.0.1:8000/ and /admin/ as\n"
            f"  username: {username}\n  password: {password}\n"
            f"API token (Authorization: Token ...): {token.key}\n"
        )
        Path(credentials_file).write_text(text)
        Path(credentials_file).chmod(0o600)
        self.stdout.write(self.style.SUCCESS("Created the development account.") + "\n" + text)
