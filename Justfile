# The prediction audit service. `just` lists the recipes.

set dotenv-load := false

export UV_PROJECT_ENVIRONMENT := justfile_directory() / ".venv"
export PYTHONPATH := justfile_directory()
export TF_CPP_MIN_LOG_LEVEL := env("TF_CPP_MIN_LOG_LEVEL", "2")

uv := `command -v uv 2>/dev/null || echo "python3 -m uv"`
run := uv + " run --frozen --no-sync"

# list the recipes
default:
    @just --list --unsorted

# create .venv from uv.lock (idempotent; installs uv first if it is missing)
[group('setup')]
setup:
    @command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --user uv
    @{{uv}} sync --frozen --quiet

# serve on HOST:PORT (default 127.0.0.1:8000), with the projection worker as a child process; embedded PostgreSQL unless DATABASE_URL is set
[group('run')]
serve: setup
    {{run}} python -m cli serve

# run a projection worker on its own (one active per projection, others stand by; pair with PROJECTIONS=off on the service)
[group('run')]
project: setup
    {{run}} python -m cli project

# run the test suite (embedded PostgreSQL unless DATABASE_URL is set); extra args go to pytest
[group('test')]
[positional-arguments]
test *ARGS: setup
    {{run}} pytest "$@"

# rebuild the read tables from position 0 and swap them in while the API keeps answering
[group('audit')]
rebuild: setup
    {{run}} python -m cli rebuild

# verify the hash chain, the outside checkpoints and the read tables (exit 1 names the first difference)
[group('audit')]
[positional-arguments]
verify *ARGS: setup
    {{run}} python -m cli verify "$@"

# print events as NDJSON (e.g. `just replay --after 100`)
[group('audit')]
[positional-arguments]
replay *ARGS: setup
    {{run}} python -m cli replay "$@"

# check a receipt with the public endpoints and a pinned key: signed checkpoint, inclusion proofs, and consistency with an older checkpoint (--checkpoint OLD --key KEY)
[group('audit')]
[positional-arguments]
verify-receipt FILE *ARGS: setup
    {{run}} python -m cli verify-receipt "$@"

# make a new checkpoint signing key; the next checkpoint is signed by both, and both stay published
[group('audit')]
rotate-key *ARGS: setup
    {{run}} python -m cli rotate-key {{ARGS}}

# re-run the recorded model on the stored bytes of a prediction and compare
[group('audit')]
reproduce ID: setup
    {{run}} python -m cli reproduce {{ID}}

# send labels from a CSV (prediction_id,label[,source,note]) or NDJSON file to the running service, in batches
[group('audit')]
[positional-arguments]
labels-import FILE *ARGS: setup
    {{run}} python -m cli labels-import "$@"

# each served model's quality against its current labels: a table and the confusion matrix (optionally one model, by sha256 prefix)
[group('audit')]
[positional-arguments]
quality *ARGS: setup
    {{run}} python -m cli quality "$@"

# retrain the default model from a local .npz (`--online` uses Keras' MNIST download instead)
[group('model')]
[positional-arguments]
train *ARGS: setup
    {{run}} python saved_model/train.py "$@"

# model-only throughput and latency by batch size
[group('bench')]
bench-model *ARGS: setup
    {{run}} python bench/model_bench.py {{ARGS}}

# end to end under wrk, beside the naive reference and the ceilings, on throwaway databases; writes BENCHMARKS.md (`just bench --profile` adds py-spy); then bench-tlog, bench-labels and bench-memory
[group('bench')]
bench *ARGS: setup
    @command -v wrk >/dev/null 2>&1 || (echo "installing wrk from Debian" && apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
    {{uv}} run --frozen --group bench python bench/run.py {{ARGS}}
    {{run}} python bench/tlog_bench.py
    {{run}} python bench/labels_bench.py
    {{run}} python bench/memory_bench.py

# memory over 100,000 uploads: RSS of the service's processes after 10,000 and every 10,000 after, against 5% growth; writes BENCHMARKS.md's memory section
[group('bench')]
bench-memory *ARGS: setup
    @command -v wrk >/dev/null 2>&1 || (echo "installing wrk from Debian" && apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
    {{run}} python bench/memory_bench.py {{ARGS}}

# ground truth at scale: bulk labels on a 2M-event log, quality now and as of a position, uploads while labelling
[group('bench')]
bench-labels *ARGS: setup
    @command -v wrk >/dev/null 2>&1 || (echo "installing wrk from Debian" && apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
    {{run}} python bench/labels_bench.py {{ARGS}}

# the transparency log alone: integrator catch-up, proofs and tiles on a synthetic 10M-leaf tree (`--leaves N`)
[group('bench')]
bench-tlog *ARGS: setup
    @command -v wrk >/dev/null 2>&1 || (echo "installing wrk from Debian" && apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
    {{run}} python bench/tlog_bench.py {{ARGS}}

# the audit console's pages timed on a synthetic log of a million predictions (`--predictions N`)
[group('bench')]
bench-console *ARGS: setup
    {{run}} python bench/console_bench.py {{ARGS}}

# delete an original upload for retention or erasure; the chain stays intact and records why
[group('audit')]
[positional-arguments]
erase DIGEST *ARGS: setup
    {{run}} python -m cli erase "$@"

# a cluster on this machine: PostgreSQL primary + streaming standby, NODES service nodes (default 3) reading through it, HAProxy in front; Ctrl-C stops it all
[group('run')]
[positional-arguments]
cluster *ARGS: setup
    @command -v haproxy >/dev/null 2>&1 || (echo "installing haproxy from Debian" && apt-get update -qq && apt-get install -y -qq haproxy >/dev/null)
    {{run}} python -m harness.cluster "$@"

# how far one primary carries the write path: uploads through HAProxy with 1, 2, 3 nodes and the append path alone; writes BENCHMARKS.md's cluster section
[group('bench')]
[positional-arguments]
bench-cluster *ARGS: setup
    @command -v wrk >/dev/null 2>&1 || (echo "installing wrk from Debian" && apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
    @command -v haproxy >/dev/null 2>&1 || (echo "installing haproxy from Debian" && apt-get update -qq && apt-get install -y -qq haproxy >/dev/null)
    {{uv}} run --frozen --group bench python -m bench.cluster_bench "$@"
