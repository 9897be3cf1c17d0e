"""Settings from the environment: database URLs, the generated secret key, sizes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from appliance.config import (
    database_from_url,
    env_bool,
    env_choice,
    env_number,
    env_server_names,
    parse_size,
    secret_key,
)


@pytest.mark.django_db
def test_the_tests_run_on_the_database_database_url_names() -> None:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres", "pgsql")):
        assert connection.vendor == "postgresql"
        # pytest-django made a test_ database beside the one the URL names.
        name = database_from_url(url, default_sqlite=Path("unused"))["NAME"]
        assert connection.settings_dict["NAME"] == f"test_{name}"
    else:
        assert connection.vendor == "sqlite"
        assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"


def test_sqlite_under_var_when_database_url_is_unset(tmp_path: Path) -> None:
    for url in (None, ""):
        db = database_from_url(url, default_sqlite=tmp_path / "appliance.sqlite3")
        assert db["ENGINE"] == "django.db.backends.sqlite3"
        assert db["NAME"] == tmp_path / "appliance.sqlite3"
        assert db["OPTIONS"]["transaction_mode"] == "IMMEDIATE"


def test_postgresql_url_is_taken_apart() -> None:
    db = database_from_url(
        "postgresql://app%40x:p%2Fw@db.example.net:6543/nbd?sslmode=require",
        default_sqlite=Path("unused"),
    )
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["NAME"], db["USER"], db["PASSWORD"]) == ("nbd", "app@x", "p/w")
    assert (db["HOST"], db["PORT"]) == ("db.example.net", "6543")
    assert db["OPTIONS"] == {"sslmode": "require"}
    local = database_from_url("postgres://postgres@127.0.0.1/nbd", default_sqlite=Path("x"))
    assert (local["HOST"], local["PORT"], local["PASSWORD"]) == ("127.0.0.1", "", "")


def test_sqlite_url_and_bad_urls() -> None:
    assert database_from_url("sqlite:////srv/a.db", default_sqlite=Path("x"))["NAME"] == Path(
        "/srv/a.db"
    )
    assert database_from_url("sqlite:///rel.db", default_sqlite=Path("x"))["NAME"] == Path(
        "rel.db"
    )
    with pytest.raises(ValueError, match="not supported"):
        database_from_url("mysql://root@localhost/x", default_sqlite=Path("x"))
    with pytest.raises(ValueError, match="names no database"):
        database_from_url("postgresql://localhost", default_sqlite=Path("x"))


def test_secret_key_is_generated_once_and_kept_private(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DJANGO_SECRET_KEY", raising=False)
    var = tmp_path / "var"
    first = secret_key(var)
    assert len(first) >= 50
    assert secret_key(var) == first
    path = var / "secret_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first
    assert [p.name for p in var.iterdir()] == ["secret_key"]  # no temporary files left
    monkeypatch.setenv("DJANGO_SECRET_KEY", "from-the-environment")
    assert secret_key(var) == "from-the-environment"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("1M", 1 << 20), ("64T", 64 << 40), ("1 GiB", 1 << 30), ("2k", 2048)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "ten", "1X"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_env_bool(monkeypatch) -> None:
    monkeypatch.setenv("FLAG", "yes")
    assert env_bool("FLAG") is True
    monkeypatch.setenv("FLAG", "0")
    assert env_bool("FLAG", True) is False
    monkeypatch.delenv("FLAG")
    assert env_bool("FLAG", True) is True


def test_env_choice(monkeypatch) -> None:
    modes = ("off", "optional", "required")
    monkeypatch.delenv("NBD_TLS_MODE", raising=False)
    assert env_choice("NBD_TLS_MODE", modes, "optional") == "optional"
    monkeypatch.setenv("NBD_TLS_MODE", " Required ")
    assert env_choice("NBD_TLS_MODE", modes, "optional") == "required"
    monkeypatch.setenv("NBD_TLS_MODE", "always")
    with pytest.raises(ImproperlyConfigured,
                       match="NBD_TLS_MODE must be one of off, optional, required; got 'always'"):
        env_choice("NBD_TLS_MODE", modes, "optional")


def test_env_number(monkeypatch) -> None:
    monkeypatch.delenv("N", raising=False)
    assert env_number("N", 10.0, minimum=0.1, maximum=60, integer=False) == 10.0
    monkeypatch.setenv("N", "2.5")
    assert env_number("N", 10.0, minimum=0.1, maximum=60, integer=False) == 2.5
    monkeypatch.setenv("N", "64K")
    assert env_number("N", 1, minimum=8192, maximum=1 << 24, size=True) == 65536
    monkeypatch.setenv("N", "2048")
    assert env_number("N", 1, minimum=1, maximum=4096) == 2048
    for bad, message in [("0", "from 1 to 4096"), ("5000", "from 1 to 4096"),
                         ("1.5", "a whole number"), ("lots", "a whole number")]:
        monkeypatch.setenv("N", bad)
        with pytest.raises(ImproperlyConfigured, match=message):
            env_number("N", 1, minimum=1, maximum=4096)
    monkeypatch.setenv("N", "nan")
    with pytest.raises(ImproperlyConfigured, match="a number from"):
        env_number("N", 1.0, minimum=0.1, maximum=60, integer=False)
    monkeypatch.setenv("N", "1K")
    with pytest.raises(ImproperlyConfigured, match="a size in bytes from 8192"):
        env_number("N", 1, minimum=8192, maximum=1 << 24, size=True)


def test_env_server_names(monkeypatch) -> None:
    monkeypatch.delenv("NAMES", raising=False)
    assert env_server_names("NAMES") == []
    monkeypatch.setenv("NAMES", " nbd.example.org, 192.0.2.10,,2001:DB8::1,*.example.net,"
                       "nbd.example.org")
    assert env_server_names("NAMES") == ["nbd.example.org", "192.0.2.10", "2001:db8::1",
                                         "*.example.net"]
    for bad in ["nbd_1.example.org", "exa mple", "-x.example.org", "a..b", "*"]:
        monkeypatch.setenv("NAMES", f"ok.example.org,{bad}")
        with pytest.raises(ImproperlyConfigured, match=f"{bad!r} is neither"):
            env_server_names("NAMES")


def test_settings_refuse_a_bad_tls_mode() -> None:
    import subprocess
    import sys

    env = {**os.environ, "NBD_TLS_MODE": "sometimes", "DJANGO_SETTINGS_MODULE":
           "appliance.settings"}
    out = subprocess.run([sys.executable, "-c", "import django; django.setup()"],
                         capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode != 0
    assert "ImproperlyConfigured: NBD_TLS_MODE must be one of off, optional, required" in (
        out.stderr)


def test_nbdcore_does_not_import_django() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, nbdcore, nbdcore.server, nbdcore.backends, nbdcore.protocol;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'appliance')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items()
                                          if k != "DJANGO_SETTINGS_MODULE"})
    assert out.stdout.strip() == "[]"
