"""Every setting of every process, read from the environment here and nowhere else.

Every timeout is a setting so tests can use short ones. The README's settings table lists each
variable; `Settings.from_env()` is the only reader of `os.environ` for configuration.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import msgspec

from domain.signed_note import NoteError, check_key_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SCOPES = ("predict", "read", "audit", "label")


class ApiKey(msgspec.Struct, frozen=True):
    name: str  # recorded as the actor of what the key writes (labels); never the key itself
    scopes: frozenset[str]


ApiKeys = dict[bytes, ApiKey]  # sha256(key) -> its name and scopes: only digests are kept in memory


class SettingsError(ValueError):
    """A setting is present but unusable: the process refuses to start and says which and why."""


def parse_api_keys(spec: str | None) -> ApiKeys:
    """`[NAME@]KEY:scope,scope;…` -> {sha256(KEY): ApiKey}; None (unset) -> no keys.

    A key without a name is named `key-` and the first 8 hex digits of its sha256.

    A value that is set must hold at least one well-formed key: a blank or separator-only value
    would otherwise switch authentication off without a word.
    """
    if spec is None:
        return {}
    keys: ApiKeys = {}
    for entry in (part.strip() for part in spec.split(";")):
        if not entry:
            continue
        key, _, scopes = entry.rpartition(":")
        if not key.strip():
            raise SettingsError("API_KEYS entries look like KEY:scope1,scope2 (separated by ;)")
        wanted = frozenset(s.strip() for s in scopes.split(",") if s.strip())
        unknown = wanted - set(SCOPES)
        if unknown or not wanted:
            raise SettingsError(f"API_KEYS: unknown or missing scopes {sorted(unknown)}; use {', '.join(SCOPES)}")
        name, at, secret = key.strip().rpartition("@")
        if at and not name.strip():
            raise SettingsError("API_KEYS: a key's name (NAME@KEY:scopes) must not be blank")
        digest = hashlib.sha256(secret.strip().encode()).digest()
        keys[digest] = ApiKey(name=name.strip() or f"key-{digest.hex()[:8]}", scopes=wanted)
    if not keys:
        raise SettingsError("API_KEYS is set but holds no key: unset it, or give KEY:scope1,scope2;…")
    return keys


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _number(name: str, default: float, kind: type[int] | type[float]) -> Any:
    value = _env(name, str(default))
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"{name} must be {'an integer' if kind is int else 'a number'}; got {value!r}") from None


def _int(name: str, default: int) -> int:
    return _number(name, default, int)


def _float(name: str, default: float) -> float:
    return _number(name, default, float)


def _positive_int(name: str, default: int) -> int:
    value = _int(name, default)
    if value < 1:
        raise SettingsError(f"{name} must be a positive integer; got {value}")
    return value


def _share(name: str, default: float) -> float:
    value = _float(name, default)
    if not 0 < value <= 1:
        raise SettingsError(f"{name} must be a fraction in (0, 1]; got {value}")
    return value


def _flag(name: str) -> bool:
    return _env(name, "0").lower() in ("1", "true", "yes", "on")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _log_origin(value: str | None) -> str | None:
    """A signed-note key name: the checkpoints' origin names the key too (as in Go's sumdb)."""
    if value is not None:
        try:
            check_key_name(value)
        except NoteError as error:
            raise SettingsError(f"LOG_ORIGIN: {error}") from None
    return value


def _node_name(value: str | None) -> str | None:
    """Goes into PostgreSQL's application_name (63 bytes, ASCII kept), after the worker's name."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > 24 or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in value):
        raise SettingsError(f"NODE_NAME must be 1-24 characters of letters, digits, '-', '_', '.'; got {value!r}")
    return value


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None  # superuser/owner URL for migrations; None: the embedded server
    app_database_url: str | None  # the service's own (non-superuser) login; derived when None
    database_read_url: str | None  # optional read replica for queries (read-your-writes still holds)
    embedded_pgdata: Path
    host: str
    port: int
    workers: int
    model_path: Path
    inference_threads: int  # TensorFlow intra-op threads
    max_upload_bytes: int
    body_read_timeout_s: float
    header_read_timeout_s: float  # the request line and headers must arrive within this
    inline_decode_max_pixels: int  # images up to this size decode on the event loop, larger ones in threads
    max_batch: int
    max_queue: int
    batch_max_wait_ms: float
    max_group: int
    pool_size: int
    connect_timeout_s: float
    lock_timeout_ms: int
    statement_timeout_ms: int
    idle_in_transaction_timeout_ms: int
    projections: str  # process (a child of `just serve`) | inline (in the event loop) | off
    projection_poll_s: float
    projection_coalesce_s: float  # after a batch, let this long of commits gather before the next
    projection_batch_size: int  # events per projection transaction at most
    projection_lock_poll_s: float  # how often a standby worker tries to take over
    read_your_writes_timeout_s: float
    replica_max_wait_s: float  # how long a read waits for the replica to replay what was committed
    replica_retry_s: float  # after the replica was unreachable or too far behind: primary reads this long
    node_name: str | None  # names this node in the elected workers' sessions (readiness says who is active)
    readiness_max_lag_events: int  # 0: lag never turns readiness red
    checkpoint_dir: Path
    checkpoint_key: Path  # Ed25519 private key (PEM) that signs checkpoints; never in the database
    checkpoint_interval_s: float  # at most one signed checkpoint per interval while the log grows
    checkpoint_wait_timeout_s: float  # how long `Prefer: wait=checkpoint` holds an answer at most
    log_origin: str | None  # the checkpoints' origin line and key name; None: derived from the log id
    tree_integrator: bool  # the Merkle tree integrator runs beside the projection worker
    tree_batch_size: int  # events per tree transaction at most
    api_keys: ApiKeys  # from "key1:predict,read;key2:audit"; empty (API_KEYS unset): no keys required
    allow_unauthenticated: bool  # serve a non-loopback HOST without keys (something in front authenticates)
    client_api_key: str | None  # the key the command-line clients (just labels-import) present
    audit_jobs: bool  # this process runs the verify and reproduce jobs asked for over HTTP
    audit_job_timeout_s: float  # one job's time at most; then it is stopped and failed
    audit_job_queue_max: int  # open jobs at most; more requests are refused (503) until some finish
    labels_share_while_uploading: float  # of the time, at most, for bulk labels while uploads arrive (1: no limit)
    log_level: str

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            app_database_url=os.environ.get("APP_DATABASE_URL") or None,
            database_read_url=os.environ.get("DATABASE_READ_URL") or None,
            embedded_pgdata=Path(_env("EMBEDDED_PGDATA", str(PROJECT_ROOT / ".data" / "pgdata"))),
            host=_env("HOST", "127.0.0.1"),
            port=_int("PORT", 8000),
            workers=_int("WORKERS", 1),
            model_path=Path(_env("MODEL_PATH", str(PROJECT_ROOT / "saved_model" / "mnist_convnet.keras"))),
            # One intra-op thread was fastest up to batch 16 on 2 cores (BENCHMARKS.md): the
            # event loop needs the other core.
            inference_threads=_positive_int("INFERENCE_THREADS", 1),
            max_upload_bytes=_int("MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
            body_read_timeout_s=_float("BODY_READ_TIMEOUT_S", 30.0),
            header_read_timeout_s=_float("HEADER_READ_TIMEOUT_S", 10.0),
            inline_decode_max_pixels=_int("INLINE_DECODE_MAX_PIXELS", 128 * 128),
            max_batch=_int("MAX_BATCH", 64),
            max_queue=_int("MAX_QUEUE", 1024),
            batch_max_wait_ms=_float("BATCH_MAX_WAIT_MS", 0.0),
            max_group=_int("MAX_GROUP", 256),
            pool_size=_int("DB_POOL_SIZE", 8),
            connect_timeout_s=_float("DB_CONNECT_TIMEOUT_S", 5.0),
            lock_timeout_ms=_int("DB_LOCK_TIMEOUT_MS", 5000),
            statement_timeout_ms=_int("DB_STATEMENT_TIMEOUT_MS", 10000),
            idle_in_transaction_timeout_ms=_int("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", 15000),
            projections=_choice("PROJECTIONS", "process", ("process", "inline", "off")),
            projection_poll_s=_float("PROJECTION_POLL_S", 1.0),
            projection_coalesce_s=_float("PROJECTION_COALESCE_S", 0.02),
            projection_batch_size=_positive_int("PROJECTION_BATCH_SIZE", 1000),
            projection_lock_poll_s=_float("PROJECTION_LOCK_POLL_S", 1.0),
            read_your_writes_timeout_s=_float("READ_YOUR_WRITES_TIMEOUT_S", 5.0),
            replica_max_wait_s=_float("REPLICA_MAX_WAIT_S", 1.0),
            replica_retry_s=_float("REPLICA_RETRY_S", 5.0),
            node_name=_node_name(os.environ.get("NODE_NAME")),
            readiness_max_lag_events=_int("READINESS_MAX_LAG_EVENTS", 0),
            checkpoint_dir=Path(_env("CHECKPOINT_DIR", str(PROJECT_ROOT / ".data" / "checkpoints"))),
            checkpoint_key=Path(_env("CHECKPOINT_KEY", str(PROJECT_ROOT / ".data" / "checkpoint_ed25519.pem"))),
            checkpoint_interval_s=_float("CHECKPOINT_INTERVAL_MS", 1000.0) / 1000,
            checkpoint_wait_timeout_s=_float("CHECKPOINT_WAIT_TIMEOUT_S", 10.0),
            log_origin=_log_origin(os.environ.get("LOG_ORIGIN") or None),
            tree_integrator=_choice("TREE_INTEGRATOR", "on", ("on", "off")) == "on",
            tree_batch_size=_positive_int("TREE_BATCH_SIZE", 20_000),
            api_keys=parse_api_keys(os.environ.get("API_KEYS")),
            allow_unauthenticated=_flag("ALLOW_UNAUTHENTICATED"),
            client_api_key=os.environ.get("AUDIT_API_KEY") or None,
            audit_jobs=_choice("AUDIT_JOBS", "on", ("on", "off")) == "on",
            audit_job_timeout_s=_float("AUDIT_JOB_TIMEOUT_S", 600.0),
            audit_job_queue_max=_positive_int("AUDIT_JOB_QUEUE_MAX", 8),
            labels_share_while_uploading=_share("LABELS_SHARE_WHILE_UPLOADING", 0.05),
            log_level=_env("LOG_LEVEL", "INFO"),
        )
