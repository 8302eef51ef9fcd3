"""R3MES settings: one file, driven by the environment.

Every value comes from an environment variable read through a typed helper. A malformed value
stops start-up with one line naming the variable (see `fail`).
"""

import os
import secrets
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


class SettingError(SystemExit):
    """Raised for a bad setting: exits the process with a single clear line."""


def fail(name, problem):
    raise SettingError(f"R3MES configuration error: {name} {problem}")


def env_str(name, default=None, *, required=False):
    value = os.environ.get(name)
    if value is None or value == "":
        if required:
            fail(name, "must be set")
        return default
    return value


def env_bool(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    fail(name, f"must be a boolean (1/0, true/false, yes/no, on/off), got {value!r}")


def env_int(name, default, *, minimum=None, maximum=None):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        fail(name, f"must be an integer, got {value!r}")
    if minimum is not None and number < minimum:
        fail(name, f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        fail(name, f"must be <= {maximum}, got {number}")
    return number


def env_float(name, default, *, minimum=None, maximum=None):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        fail(name, f"must be a number, got {value!r}")
    if minimum is not None and number < minimum:
        fail(name, f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        fail(name, f"must be <= {maximum}, got {number}")
    return number


def env_decimal(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return Decimal(default)
    try:
        return Decimal(value)
    except InvalidOperation:
        fail(name, f"must be a decimal number, got {value!r}")


def env_list(name, default):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


# --- Paths -------------------------------------------------------------------------------------

DATA_DIR = Path(env_str("R3MES_DATA_DIR", str(BASE_DIR / "var"))).resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    fail("R3MES_DATA_DIR", f"cannot be created at {DATA_DIR}: {exc.strerror}")
if not os.access(DATA_DIR, os.W_OK):
    fail("R3MES_DATA_DIR", f"is not writable: {DATA_DIR}")
BLOB_DIR = DATA_DIR / "blobs"
INDEX_DIR = DATA_DIR / "indexes"
MODEL_CACHE_DIR = Path(env_str("R3MES_MODEL_CACHE_DIR", str(DATA_DIR / "models"))).resolve()
ADAPTER_DIR = DATA_DIR / "adapters"
MEDIA_ROOT = DATA_DIR / "media"


def _secret_key():
    key = env_str("SECRET_KEY")
    if key is not None:
        if len(key) < 32:
            fail("SECRET_KEY", "must be at least 32 characters long")
        return key
    # Generated once and kept in the data dir, so sessions survive restarts without any set-up.
    path = DATA_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- Applications ------------------------------------------------------------------------------

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "django_prometheus",
    "r3mes_site",
    "governance",
    "inference",
    "rag",
    "mining",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "r3mes_site.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "r3mes_site.urls"
ASGI_APPLICATION = "r3mes_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "r3mes_site.context_processors.navigation",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    import dj_database_url

    try:
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
    except Exception as exc:  # dj-database-url raises several types for bad URLs
        fail("DATABASE_URL", f"is not a valid database URL ({exc})")
    if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        DATABASES["default"].setdefault("OPTIONS", {})["transaction_mode"] = "IMMEDIATE"
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "r3mes.sqlite3",
            "OPTIONS": {
                # WAL lets the web, worker and Celery processes read while one writes;
                # IMMEDIATE transactions avoid lock-upgrade deadlocks between them.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
            # A file, not shared-cache memory, for the test database too: live-server tests run
            # Celery workers and Daphne threads beside the test, and shared-cache SQLite answers
            # their concurrent writes with "table is locked" instead of waiting.
            "TEST": {"NAME": str(DATA_DIR / "test-r3mes.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "governance.User"

# --- Redis, Channels, Celery, cache -----------------------------------------------------------

# Each instance gets its own Redis port (PORT + 10000) unless REDIS_URL says otherwise, so two
# instances started with different PORTs never share state.
REDIS_URL = env_str("REDIS_URL", f"redis://127.0.0.1:{PORT + 10000}/0")
if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    fail("REDIS_URL", f"must start with redis://, rediss:// or unix://, got {REDIS_URL!r}")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # redis-py 8 defaults to a 5 s socket timeout, the same as channels_redis's blocking-pop
        # timeout; a longer socket timeout keeps idle receivers from timing out.
        "CONFIG": {
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 2}],
            "capacity": 1000,
            "expiry": 60,
        },
    }
}
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {}

# --- Auth --------------------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads it to send X-CSRFToken
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# --- Static and uploads ------------------------------------------------------------------------

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
# WhiteNoise serves straight from static/ and the apps, so no collectstatic step is needed.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
R3MES_MAX_UPLOAD_BYTES = env_int("R3MES_MAX_UPLOAD_BYTES", 25 * 1024 * 1024, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Inference ---------------------------------------------------------------------------------

R3MES_BACKBONE = env_str("R3MES_BACKBONE", "")  # empty: the embedded SmolLM2-135M-Instruct
R3MES_DTYPE = env_str("R3MES_DTYPE", "float32")
if R3MES_DTYPE not in ("float32", "bfloat16"):
    fail("R3MES_DTYPE", f"must be float32 or bfloat16, got {R3MES_DTYPE!r}")
R3MES_DEVICE = env_str("R3MES_DEVICE", "auto")
# How the served backbone's weights are stored and multiplied (DoRA paths stay exact). auto: the
# packed ternary kernel for BitNet b1.58 checkpoints, int4 weight-only for dense ones (3-4x float32
# decode, mean KL 0.044 against float32: benchmarks/RESULTS.md); none keeps the float weights.
R3MES_QUANT = env_str("R3MES_QUANT", "auto")
if R3MES_QUANT not in ("auto", "none", "int8", "int4", "ternary"):
    fail("R3MES_QUANT", f"must be auto, none, int8, int4 or ternary, got {R3MES_QUANT!r}")
# Compile the decode steps (a lone sequence, a batch in a run of KV slots) in the background once
# the worker serves (torch.compile/Inductor, ~1.6x eager decode; ~10-13 min on a cold Inductor
# cache under R3MES_DATA_DIR, 1.5-2.5 min warm; requests decode eagerly meanwhile).
R3MES_COMPILE = env_bool("R3MES_COMPILE", True)
# ...with adapter mixtures whose ranks sum to at most this per projection in the graphs too (a
# batch's adapters together: twice this); the width is a symbol of the graphs, so a narrower
# mixture reads only its own factors; 0: mixtures decode eagerly and the start compiles half the
# graphs.
R3MES_COMPILE_MIXTURE_RANK = env_int("R3MES_COMPILE_MIXTURE_RANK", 64, minimum=0)
R3MES_WORKER_PING_TIMEOUT = env_float("R3MES_WORKER_PING_TIMEOUT", 2.0, minimum=0.1)
R3MES_TORCH_THREADS = env_int("R3MES_TORCH_THREADS", 0, minimum=0)

# --- Logging -----------------------------------------------------------------------------------

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    fail("LOG_LEVEL", f"must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {LOG_LEVEL!r}")
LOG_FORMAT = env_str("LOG_FORMAT", "json")
if LOG_FORMAT not in ("json", "text"):
    fail("LOG_FORMAT", f"must be json or text, got {LOG_FORMAT!r}")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "r3mes_site.logging.RequestIdFilter"}},
    "formatters": {
        "json": {"()": "r3mes_site.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "stream": sys.stderr,
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "daphne": {"level": "INFO"},
        "faiss.loader": {"level": "WARNING"},
        "bm25s": {"level": "WARNING"},
    },
}

# --- Rate limits: (requests, per seconds) per user ---------------------------------------------

R3MES_RATE_API = (env_int("R3MES_RATE_API_PER_MINUTE", 120, minimum=1), 60)
R3MES_RATE_CHAT = (env_int("R3MES_RATE_CHAT_PER_MINUTE", 30, minimum=1), 60)

# --- Blob store ---------------------------------------------------------------------------------

IPFS_API_URL = env_str("IPFS_API_URL", "")

# --- Governance --------------------------------------------------------------------------------
# Cosmos x/gov (SDK v0.50) defaults. Amounts are in stake units; periods in seconds, so tests and
# small communities can use short ones.


def env_ratio(name, default):
    value = env_decimal(name, default)
    if not Decimal(0) <= value <= Decimal(1):
        fail(name, f"must be between 0 and 1, got {value}")
    return value


R3MES_GOV_MIN_DEPOSIT = env_decimal("R3MES_GOV_MIN_DEPOSIT", "10")
R3MES_GOV_EXPEDITED_MIN_DEPOSIT = env_decimal("R3MES_GOV_EXPEDITED_MIN_DEPOSIT", "50")
R3MES_GOV_DEPOSIT_PERIOD = env_int("R3MES_GOV_DEPOSIT_PERIOD", 2 * 24 * 3600, minimum=1)
R3MES_GOV_VOTING_PERIOD = env_int("R3MES_GOV_VOTING_PERIOD", 2 * 24 * 3600, minimum=1)
R3MES_GOV_EXPEDITED_VOTING_PERIOD = env_int("R3MES_GOV_EXPEDITED_VOTING_PERIOD", 24 * 3600, minimum=1)
R3MES_GOV_QUORUM = env_ratio("R3MES_GOV_QUORUM", "0.334")
R3MES_GOV_THRESHOLD = env_ratio("R3MES_GOV_THRESHOLD", "0.5")
R3MES_GOV_VETO_THRESHOLD = env_ratio("R3MES_GOV_VETO_THRESHOLD", "0.334")
R3MES_GOV_EXPEDITED_THRESHOLD = env_ratio("R3MES_GOV_EXPEDITED_THRESHOLD", "0.667")
# What happens to deposits (Cosmos params of the same names): burned on veto, refunded when the
# quorum is missed or the deposit period expires; cancelling burns this share and refunds the rest.
R3MES_GOV_BURN_VOTE_VETO = env_bool("R3MES_GOV_BURN_VOTE_VETO", True)
R3MES_GOV_BURN_VOTE_QUORUM = env_bool("R3MES_GOV_BURN_VOTE_QUORUM", False)
R3MES_GOV_BURN_PROPOSAL_DEPOSIT_PREVOTE = env_bool("R3MES_GOV_BURN_PROPOSAL_DEPOSIT_PREVOTE", False)
R3MES_GOV_PROPOSAL_CANCEL_RATIO = env_ratio("R3MES_GOV_PROPOSAL_CANCEL_RATIO", "0.5")
R3MES_GOV_CLOSE_INTERVAL = env_int("R3MES_GOV_CLOSE_INTERVAL", 10, minimum=1)
if R3MES_GOV_MIN_DEPOSIT <= 0:
    fail("R3MES_GOV_MIN_DEPOSIT", f"must be positive, got {R3MES_GOV_MIN_DEPOSIT}")
if R3MES_GOV_EXPEDITED_MIN_DEPOSIT < R3MES_GOV_MIN_DEPOSIT:
    fail("R3MES_GOV_EXPEDITED_MIN_DEPOSIT", "must not be below R3MES_GOV_MIN_DEPOSIT (Cosmos rule)")
if R3MES_GOV_EXPEDITED_VOTING_PERIOD >= R3MES_GOV_VOTING_PERIOD:
    fail("R3MES_GOV_EXPEDITED_VOTING_PERIOD", "must be shorter than R3MES_GOV_VOTING_PERIOD (Cosmos rule)")
if R3MES_GOV_EXPEDITED_THRESHOLD <= R3MES_GOV_THRESHOLD:
    fail("R3MES_GOV_EXPEDITED_THRESHOLD", "must be above R3MES_GOV_THRESHOLD (Cosmos rule)")
CELERY_BEAT_SCHEDULE["governance-close-due"] = {
    "task": "governance.tasks.close_due_proposals",
    "schedule": float(R3MES_GOV_CLOSE_INTERVAL),
}

# --- Ledger, chain sync and model versions ---

# Peers pull blocks and blobs from these unauthenticated endpoints, so they get their own limit
# (per client address).
R3MES_RATE_PEER = (env_int("R3MES_RATE_PEER_PER_MINUTE", 600, minimum=1), 60)
R3MES_PEER_CONNECT_TIMEOUT = env_float("R3MES_PEER_CONNECT_TIMEOUT", 5.0, minimum=0.1)
R3MES_PEER_READ_TIMEOUT = env_float("R3MES_PEER_READ_TIMEOUT", 30.0, minimum=0.1)
R3MES_PEER_MAX_PAGE_BYTES = env_int("R3MES_PEER_MAX_PAGE_BYTES", 32 * 1024 * 1024, minimum=1024)
R3MES_PEER_MAX_BLOB_BYTES = env_int("R3MES_PEER_MAX_BLOB_BYTES", 64 * 1024**3, minimum=1)
R3MES_CHAIN_SYNC_PAGE = env_int("R3MES_CHAIN_SYNC_PAGE", 200, minimum=1, maximum=1000)
R3MES_CHAIN_SYNC_INTERVAL = env_float("R3MES_CHAIN_SYNC_INTERVAL", 60.0, minimum=1)
R3MES_CHAIN_SYNC_LOCK_S = env_int("R3MES_CHAIN_SYNC_LOCK_S", 900, minimum=10)
# Free space kept beyond a backbone's size when downloading it.
R3MES_MODEL_DISK_MARGIN_BYTES = env_int("R3MES_MODEL_DISK_MARGIN_BYTES", 512 * 1024 * 1024, minimum=0)
R3MES_MODEL_FETCH_TIMEOUT = env_float("R3MES_MODEL_FETCH_TIMEOUT", 60.0, minimum=0.1)
CELERY_BEAT_SCHEDULE["mining-chain-sync"] = {"task": "mining.sync_chain", "schedule": R3MES_CHAIN_SYNC_INTERVAL}

# --- RAG ---------------------------------------------------------------------------------------

# Chunk size counts tokens of the embedding tokenizer including [CLS]/[SEP]: what the model sees.
R3MES_RAG_CHUNK_TOKENS = env_int("R3MES_RAG_CHUNK_TOKENS", 512, minimum=16)
R3MES_RAG_CHUNK_OVERLAP = env_int("R3MES_RAG_CHUNK_OVERLAP", 50, minimum=0)
if R3MES_RAG_CHUNK_OVERLAP >= R3MES_RAG_CHUNK_TOKENS // 2:
    fail("R3MES_RAG_CHUNK_OVERLAP", f"must be less than half of R3MES_RAG_CHUNK_TOKENS ({R3MES_RAG_CHUNK_TOKENS})")
R3MES_RAG_EMBED_BATCH = env_int("R3MES_RAG_EMBED_BATCH", 32, minimum=1)
# Above this many vectors a collection's FAISS index switches from exact (flat) to HNSW.
R3MES_RAG_HNSW_THRESHOLD = env_int("R3MES_RAG_HNSW_THRESHOLD", 50000, minimum=1)
# Candidates taken from each of the dense and BM25 lists before reciprocal rank fusion.
R3MES_RAG_CANDIDATES = env_int("R3MES_RAG_CANDIDATES", 50, minimum=1)
R3MES_RAG_MIN_SCORE = env_float("R3MES_RAG_MIN_SCORE", 0.0)
R3MES_RAG_NEWS_TTL_DAYS = env_int("R3MES_RAG_NEWS_TTL_DAYS", 7, minimum=1)
# A document "processing" for longer than this is taken to have lost its worker (re-queued by beat).
R3MES_RAG_STALE_SECONDS = env_int("R3MES_RAG_STALE_SECONDS", 1800, minimum=10)
R3MES_RAG_MAX_ATTEMPTS = env_int("R3MES_RAG_MAX_ATTEMPTS", 3, minimum=1)

CELERY_BEAT_SCHEDULE["rag-purge-expired"] = {"task": "rag.tasks.purge_expired_documents", "schedule": 3600.0}
CELERY_BEAT_SCHEDULE["rag-recover-stale"] = {"task": "rag.tasks.recover_stale_documents", "schedule": 300.0}

# --- Playground / inference worker ---------------------------------------------------------------

R3MES_MAX_BATCH = env_int("R3MES_MAX_BATCH", 8, minimum=1)  # sequences decoded together per step
R3MES_MAX_QUEUE = env_int("R3MES_MAX_QUEUE", 32, minimum=0)  # waiting beyond the batch; then "busy, retry"
R3MES_MAX_SEQ_LEN = env_int("R3MES_MAX_SEQ_LEN", 2048, minimum=64)  # KV cache length per sequence
R3MES_MAX_NEW_TOKENS = env_int("R3MES_MAX_NEW_TOKENS", 1024, minimum=1)
R3MES_DEFAULT_MAX_TOKENS = env_int("R3MES_DEFAULT_MAX_TOKENS", 256, minimum=1)
# Applied when a request names none (playground, API, CLI): a token among the last 64 of the
# sequence has its logit divided by this (llama.cpp's repeat_penalty); 1 = off. 1.1 breaks the
# default model's greedy loops and doubled the RAG answers that contain the expected phrase (3 -> 6
# of 13; 1.3: 1 of 13), benchmarks/RESULTS.md.
R3MES_REPETITION_PENALTY = env_float("R3MES_REPETITION_PENALTY", 1.1, minimum=0.01, maximum=2.0)
R3MES_MAX_PROMPT_CHARS = env_int("R3MES_MAX_PROMPT_CHARS", 16000, minimum=1)  # one message
R3MES_MAX_MESSAGES = env_int("R3MES_MAX_MESSAGES", 100, minimum=1)
R3MES_TOKEN_FLUSH_MS = env_int("R3MES_TOKEN_FLUSH_MS", 40, minimum=5)  # token pieces batched this long
R3MES_HEARTBEAT_S = env_float("R3MES_HEARTBEAT_S", 1.0, minimum=0.1)  # worker says "still on it" this often
# The client gives up (error frame, cancel) when no worker accepts a request within ACCEPT, or no
# frame (tokens or heartbeat) arrives within IDLE.
R3MES_WORKER_ACCEPT_TIMEOUT = env_float("R3MES_WORKER_ACCEPT_TIMEOUT", 5.0, minimum=0.1)
R3MES_STREAM_IDLE_TIMEOUT = env_float("R3MES_STREAM_IDLE_TIMEOUT", 10.0, minimum=0.5)
R3MES_DRAIN_GRACE_S = env_float("R3MES_DRAIN_GRACE_S", 20.0, minimum=0)  # SIGTERM: running answers get this long

# --- Router ------------------------------------------------------------------------------------

# Hybrid router (seed Karar 1): keyword fast path, else weighted fusion with the semantic stage.
R3MES_ROUTER_FAST_PATH_THRESHOLD = env_float("R3MES_ROUTER_FAST_PATH_THRESHOLD", 0.85, minimum=0.0)
R3MES_ROUTER_KEYWORD_WEIGHT = env_float("R3MES_ROUTER_KEYWORD_WEIGHT", 0.3, minimum=0.0)
R3MES_ROUTER_SEMANTIC_WEIGHT = env_float("R3MES_ROUTER_SEMANTIC_WEIGHT", 0.7, minimum=0.0)
# `general` replaces the mixture when the best fused score is below this.
R3MES_ROUTER_FALLBACK_THRESHOLD = env_float("R3MES_ROUTER_FALLBACK_THRESHOLD", 0.5, minimum=0.0)
# Memory gating: free accelerator memory (GB) below the first bound → top-1, below the second → top-2,
# else top-3. On CPU the RAM budget below stands in for free accelerator memory.
R3MES_ROUTER_GATING_BOUNDS_GB = (
    env_float("R3MES_ROUTER_TOP1_BELOW_GB", 8.0, minimum=0.0),
    env_float("R3MES_ROUTER_TOP2_BELOW_GB", 16.0, minimum=0.0),
)
R3MES_ROUTER_CPU_BUDGET_GB = env_float("R3MES_ROUTER_CPU_BUDGET_GB", 8.0, minimum=0.0)
R3MES_ROUTER_EMBEDDINGS_DIR = Path(env_str("R3MES_ROUTER_EMBEDDINGS_DIR", str(DATA_DIR / "router"))).resolve()

# Tiered adapter cache (seed Karar 2): byte budgets per tier; prefetch of the router's next guesses.
R3MES_ADAPTER_DEVICE_BUDGET_MB = env_int("R3MES_ADAPTER_DEVICE_BUDGET_MB", 512, minimum=1)
R3MES_ADAPTER_RAM_BUDGET_MB = env_int("R3MES_ADAPTER_RAM_BUDGET_MB", 1024, minimum=1)
R3MES_ADAPTER_PREFETCH = env_bool("R3MES_ADAPTER_PREFETCH", True)

# Starter experts trained in the background on a fresh install (inference.tasks.train_starter_experts).
R3MES_STARTER_STEPS = env_int("R3MES_STARTER_STEPS", 30, minimum=1)
R3MES_STARTER_AUTO_TRAIN = env_bool("R3MES_STARTER_AUTO_TRAIN", True)
# Experts scoring below this share of the best one are not mixed in (they would only dilute it).
R3MES_ROUTER_MIN_RELATIVE_SCORE = env_float("R3MES_ROUTER_MIN_RELATIVE_SCORE", 0.75, minimum=0.0, maximum=1.0)
# Semantic cosines are rescaled to [0, 1] between these before fusion (see inference/router/hybrid.py).
R3MES_ROUTER_SEMANTIC_FLOOR = env_float("R3MES_ROUTER_SEMANTIC_FLOOR", 0.0)
R3MES_ROUTER_SEMANTIC_CEIL = env_float("R3MES_ROUTER_SEMANTIC_CEIL", 0.5)
if R3MES_ROUTER_SEMANTIC_CEIL <= R3MES_ROUTER_SEMANTIC_FLOOR:
    fail("R3MES_ROUTER_SEMANTIC_CEIL", f"must be above R3MES_ROUTER_SEMANTIC_FLOOR ({R3MES_ROUTER_SEMANTIC_FLOOR})")

# --- Mining: datasets, rounds, aggregation ------------------------------------------------------

MINING_NODE_NAME = env_str("MINING_NODE_NAME", "local")  # miner name of this node's own shard training
MINING_MAX_DATASET_BYTES = env_int("MINING_MAX_DATASET_BYTES", 20 * 1024 * 1024, minimum=1)
MINING_MAX_DATASET_EXAMPLES = env_int("MINING_MAX_DATASET_EXAMPLES", 100_000, minimum=1)
MINING_MAX_SUBMISSION_BYTES = env_int("MINING_MAX_SUBMISSION_BYTES", 200 * 1024 * 1024, minimum=1)
MINING_PREVIEW_EXAMPLES = env_int("MINING_PREVIEW_EXAMPLES", 20, minimum=1)
MINING_SCORE_EMA_ALPHA = env_float("MINING_SCORE_EMA_ALPHA", 0.3, minimum=0.0)
MINING_MIN_STAKE_TO_OPEN_ROUND = env_decimal("MINING_MIN_STAKE_TO_OPEN_ROUND", "1")
MINING_MAX_EVAL_EXAMPLES = env_int("MINING_MAX_EVAL_EXAMPLES", 64, minimum=1)
MINING_ROUND_TIMEOUT = env_int("MINING_ROUND_TIMEOUT", 6 * 3600, minimum=60)
CELERY_BEAT_SCHEDULE["mining-expire-stuck-rounds"] = {"task": "mining.tasks.expire_stuck_rounds", "schedule": 600.0}
