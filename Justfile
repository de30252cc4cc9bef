# The prediction audit service. `just` lists the recipes.

set dotenv-load := false

export UV_PROJECT_ENVIRONMENT := justfile_directory() / ".venv"
export PYTHONPATH := justfile_directory()
export TF_CPP_MIN_LOG_LEVEL := env("TF_CPP_MIN_LOG_LEVEL", "2")

uv := `command -v uv 2>/dev/null || echo "python3 -m uv"`

# list the recipes
default:
    @just --list --unsorted

# create .venv from uv.lock (idempotent; installs uv first if it is missing)
[group('setup')]
setup:
    @command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --user uv
    @{{uv}} sync --frozen --quiet

# serve on HOST:PORT (default 127.0.0.1:8000); embedded PostgreSQL unless DATABASE_URL is set
[group('run')]
serve: setup
    {{uv}} run --frozen --no-sync python -m service

# run the test suite (embedded PostgreSQL unless DATABASE_URL is set)
[group('test')]
test *ARGS: setup
    {{uv}} run --frozen --no-sync pytest {{ARGS}}
