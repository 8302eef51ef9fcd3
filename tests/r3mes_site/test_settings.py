"""Bad settings stop start-up with one line naming the variable (run in a fresh interpreter,
since settings are read once per process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOAD = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY[:4])"


def start(env_overrides, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DATABASE_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "r3mes_site.settings", "R3MES_DATA_DIR": str(tmp_path / "data")})
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", LOAD], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("DEBUG", "maybe", "DEBUG must be a boolean"),
        ("PORT", "eighty", "PORT must be an integer, got 'eighty'"),
        ("PORT", "70000", "PORT must be <= 65535"),
        ("SECRET_KEY", "short", "SECRET_KEY must be at least 32 characters"),
        ("DATABASE_URL", "nosuchdb://x/y", "DATABASE_URL is not a valid database URL"),
        ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL must start with redis://"),
        ("R3MES_DTYPE", "float8", "R3MES_DTYPE must be float32 or bfloat16"),
        ("R3MES_QUANT", "int3", "R3MES_QUANT must be auto, none, int8, int4 or ternary"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of"),
        ("R3MES_RATE_API_PER_MINUTE", "0", "R3MES_RATE_API_PER_MINUTE must be >= 1"),
        ("R3MES_WORKER_PING_TIMEOUT", "soon", "R3MES_WORKER_PING_TIMEOUT must be a number"),
    ],
)
def test_bad_setting_stops_startup_with_one_line_naming_it(tmp_path, name, value, expected):
    result = start({name: value}, tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]], f"expected a single line, got: {result.stderr}"
    assert lines[-1].startswith("R3MES configuration error: ")
    assert expected in lines[-1]


def test_unwritable_data_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = start({"R3MES_DATA_DIR": str(blocker / "data")}, tmp_path)
    assert result.returncode != 0
    assert "R3MES_DATA_DIR cannot be created" in result.stderr.strip().splitlines()[-1]


def test_secret_key_is_generated_once_and_kept_in_the_data_dir(tmp_path):
    first = start({}, tmp_path)
    second = start({}, tmp_path)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "data" / "secret_key"
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert first.stdout == second.stdout


def test_good_environment_values_are_accepted(tmp_path):
    result = start({"DEBUG": "yes", "PORT": "8123", "R3MES_DTYPE": "bfloat16", "SECRET_KEY": "x" * 40}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "xxxx"


def test_default_database_is_sqlite_in_wal_mode_under_the_data_dir(tmp_path):
    code = ("import django; django.setup(); from django.db import connection; c = connection.cursor(); "
            "c.execute('PRAGMA journal_mode'); print(c.fetchone()[0], connection.settings_dict['NAME'])")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({"DJANGO_SETTINGS_MODULE": "r3mes_site.settings", "R3MES_DATA_DIR": str(tmp_path / "data")})
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    mode, name = result.stdout.split()
    assert mode == "wal"
    assert name == str(tmp_path / "data" / "r3mes.sqlite3")
