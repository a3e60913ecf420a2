# `make run`: install, migrate and serve on http://127.0.0.1:8000 (DEBUG, with a local account).
# `make test`: install and run the whole suite (DATABASE_URL picks the database; SQLite by default).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Tests flush their Redis databases, so they get their own numbers (14, and 15 for the totals).
TEST_REDIS_URL ?= redis://127.0.0.1:6379/14

.PHONY: install run test test-postgres lint bench chaos fuzz screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

run: install
	DEBUG=1 $(PY) manage.py migrate --noinput
	DEBUG=1 $(PY) manage.py create_dev_user
	DEBUG=1 $(VENV)/bin/gunicorn -c project/gunicorn.py project.wsgi

test: install
	REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest $(PYTEST_ARGS)

test-postgres: install
	DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest $(PYTEST_ARGS)

# Re-take docs/screenshots/upload-page.png (the browser test that takes it on every run keeps it in tmp).
screenshots: install
	UPDATE_SCREENSHOTS=1 REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest -q tests/test_browser.py -k 40_mib

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/compare.py $(BENCH_ARGS)

# Load with chaos (RELIABILITY.md M1/M2), not part of `make test`: 200 concurrent uploads over REST and tus
# on PostgreSQL + its own Redis + gunicorn, a worker SIGKILLed every 10 s, Redis restarted every 30 s.
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and redis-server; e.g. CHAOS_ARGS="--json bench/out/chaos.json".
chaos: install
	$(PY) bench/chaos.py $(CHAOS_ARGS)

# The model-based and schema fuzzers with many more, freshly drawn examples than `make test`'s fixed set
# (RELIABILITY.md Tier 0: 200 examples x 50 steps). DATABASE_URL picks the database, as for `make test`.
fuzz: install
	HYPOTHESIS_PROFILE=thorough REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest -q -s tests/test_model_based.py tests/test_schema_fuzz.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) staticfiles
