"""The README must keep up with the code: every setting documented, the two set-up commands first."""
from __future__ import annotations

import re
from pathlib import Path

from project import settings as project_settings
from uploads.conf import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_every_uploads_setting_is_documented():
    names = [name for name, value in vars(Settings).items() if isinstance(value, property)]
    assert names
    for name in names:
        assert f"UPLOADS_{name}" in README, f"UPLOADS_{name} is missing from README.md"


def test_every_environment_variable_is_documented():
    project = Path(project_settings.__file__).parent
    source = "".join((project / name).read_text() for name in ("settings.py", "gunicorn.py", "gunicorn_worker.py"))
    env_vars = set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', source))
    env_vars |= set(re.findall(r'env_(?:bool|list)\("([A-Z_]+)"', source))
    env_vars |= {f"UPLOADS_{name}" for name in project_settings._UPLOADS_INT + project_settings._UPLOADS_FLOAT + project_settings._UPLOADS_BOOL}
    for name in sorted(env_vars):
        assert f"`{name}`" in README, f"{name} is read from the environment but not in README.md"


def test_redis_key_scheme_in_readme_matches_the_code():
    from uploads import progress

    assert f"{progress.KEY_PREFIX}:<owner id>:<size>:<file name>" in README
