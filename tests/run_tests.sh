#!/usr/bin/env bash
# Install what the tests need into .venv, check the style and run the tests (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/ruff check .  # style (ruff.toml): unused names, likely bugs, lines over 120
.venv/bin/python -m pytest -q "$@"
