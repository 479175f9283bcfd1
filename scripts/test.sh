#!/usr/bin/env bash
# The full test suite, in ./.venv with every extra (TensorFlow included, for the export tests).
source "$(dirname "$0")/_venv.sh" server,export,dev
# Debian packages some tests need (prometheus, openssl); only root can install them.
[ "$(id -u)" -ne 0 ] || bash scripts/system-deps.sh
.venv/bin/python proto/generate.py --check
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # the packages named in pyproject.toml [tool.mypy]
exec .venv/bin/python -P -m pytest -q -p no:cacheprovider "$@"
