#!/usr/bin/env bash
# The checks CI runs: lint, formatting, the docs site, then the test suite (with doctests and
# the docs' examples).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check lmcascade tests benchmarks examples scripts docs/_ext
# the documentation site: every page, link and API docstring must build without a warning
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
.venv/bin/python -m pytest "$@"
