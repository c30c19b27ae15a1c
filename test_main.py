"""Checkpoint tests for the lesson app: one group per lesson section.

    python -m pytest -W error                                 every checkpoint, on our main.py
    python -m pytest -W error -k test_2_1                     one checkpoint
    LESSON_APP=my_main.py python -m pytest -W error -k test_2_1     the same, on your file

A test's name starts with its section: test_2_1_... checks section 2.1, and a
failure starts with the section to reread (conftest.py writes that line).
The core is sections 0 to 5; 6 to 8 go further, and 9 to 14 harden the app.
Each checkpoint passes on the app as it stands after its section, and after
every later one.
The tests talk to the app through HTTP and to the database through the
DATABASE_URL they set. Two sections add no route: the 1.2 tests call
create_access_token with a row they insert, and the 2.1 tests put
oauth2_scheme on a test route of their own. Each test runs a fresh copy of
the app file in a folder of its own, so your .env and your database are
never read or touched.
"""

import asyncio
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from pathlib import Path

import aiosqlite
import asyncpg
import jwt
import pytest
import sqlalchemy
from fastapi import Depends
from fastapi import Request
from fastapi.testclient import TestClient
from passlib.context import CryptContext


HERE = Path(__file__).resolve().parent
APP_FILE = Path(os.environ.get("LESSON_APP", HERE / "main.py")).resolve()
# 64 bytes, so PyJWT does not warn even when a test signs with HS512.
SECRET = "a-test-secret-long-enough-for-hs256-and-even-for-hs512-0123456789"
# PostgreSQL runs only where a database is given: see the README.
DATABASES = ["sqlite", "postgresql"] if os.environ.get("TEST_DATABASE_URL") else ["sqlite"]

# A deprecated API is a bug in a teaching app: every warning fails the test.
pytestmark = pytest.mark.filterwarnings("error")


# --- Fixtures and helpers -------------------------------------------------------


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url = os.environ["TEST_DATABASE_URL"]
    # Every test starts from an empty schema: no tables, no enum types.
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE"))
        connection.execute(sqlalchemy.text("CREATE SCHEMA public"))
        # A server far from UTC, so a timestamp without its offset shows up as wrong.
        database = connection.execute(sqlalchemy.text("SELECT current_database()")).scalar()
        tokyo = f"ALTER DATABASE \"{database}\" SET timezone = 'Asia/Tokyo'"
        connection.execute(sqlalchemy.text(tokyo))
    engine.dispose()
    return url


@pytest.fixture
def app_dir(tmp_path, monkeypatch, database_url):
    """A directory holding a fresh copy of the app file, and the environment it reads."""
    directory = tmp_path / "app"
    directory.mkdir()
    shutil.copy(APP_FILE, directory / "main.py")
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("JWT_EXPIRES_MINUTES", "120")
    monkeypatch.setenv("BCRYPT_ROUNDS", "4")  # bcrypt's minimum: fast tests
    return directory


@functools.cache
def compiled(source):
    # Compiled once for the whole run: every test runs the same file.
    return compile(source, str(APP_FILE), "exec")


loaded_apps = []  # every module load_app made during the current test


def load_app(directory):
    """Run directory/main.py as a new module, as uvicorn would import it.

    Tracebacks name your own file and its line numbers, not the copy's.
    """
    module = types.ModuleType("lesson_app")
    module.__file__ = str(directory / "main.py")
    sys.modules["lesson_app"] = module
    loaded_apps.append(module)
    exec(compiled((directory / "main.py").read_text()), module.__dict__)
    return module


@pytest.fixture(autouse=True)
def stop_hashing_threads():
    # Each app's hashing threads (section 12) would keep it, and all it holds, alive to the
    # end of the run.
    yield
    while loaded_apps:
        module = loaded_apps.pop()
        for name in ("hashing_pool", "returning_pool"):
            pool = getattr(module, name, None)
            if pool is not None:
                pool.shutdown()


@pytest.fixture
def client(app_dir):
    with TestClient(load_app(app_dir).app) as client:
        yield client


@pytest.fixture
def db(database_url):
    engine = sqlalchemy.create_engine(database_url)
    yield engine
    engine.dispose()


def rows(db, sql, **params):
    with db.connect() as connection:
        return connection.execute(sqlalchemy.text(sql), params).mappings().all()


def run_sql(db, sql, **params):
    with db.begin() as connection:
        connection.execute(sqlalchemy.text(sql), params)


def expect(response, status_code, section):
    request = response.request
    assert response.status_code == status_code, (
        f"{section}: {request.method} {request.url.path} should answer {status_code}, "
        f"got {response.status_code}: {response.text[:300]}"
    )


def expect_401(response, detail, section):
    expect(response, 401, section)
    assert response.json() == {"detail": detail}, (
        f"{section}: expected detail {detail!r}, got {response.json()}"
    )
    assert response.headers.get("www-authenticate") == "Bearer", (
        f"{section}: a 401 must say how to authenticate: WWW-Authenticate: Bearer"
    )


def register(client, email="ada@example.com", password="correct horse", **extra):
    body = {"email": email, "password": password, "full_name": "Ada Lovelace", **extra}
    response = client.post("/register", json=body)
    expect(response, 201, "1.3 register")
    return response.json()["token"]


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def user_id(db, email):
    return rows(db, "SELECT id FROM users WHERE email = :email", email=email)[0]["id"]


def set_role(db, email, role):
    run_sql(db, "UPDATE users SET role = :role WHERE email = :email", role=role, email=email)


def make_token(payload, key=SECRET, algorithm="HS256"):
    return jwt.encode(payload, key, algorithm=algorithm)


def in_one_hour():
    return datetime.now(timezone.utc) + timedelta(hours=1)


def until(condition, seconds=5):
    """Ask condition() every 10 ms until it holds, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def patch_app(monkeypatch, module, name, value):
    """Set one of the app's names for this test only."""
    getattr(module, name)  # a missing name fails naming the section that adds it
    monkeypatch.setattr(module, name, value)


RFC_3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
SHIRT = {
    "name": "Linen shirt",
    "photo_url": "https://example.com/shirt.jpg",
    "size": "m",
    "color": "white",
}
BODY = {"email": "ada@example.com", "password": "correct horse", "full_name": "Ada L"}
JSON_HEADERS = {"Content-Type": "application/json"}
# An answer with a token holds it alone; from section 8 on, with a refresh token too.
TOKEN_ANSWERS = (["token"], ["token", "refresh_token"])


# --- 0 The app as part 3 left it ---------------------------------------------------


def test_0_startup_creates_both_tables(client, db):
    tables = sqlalchemy.inspect(db).get_table_names()
    assert {"users", "clothes"} <= set(tables), f"0: create both tables at startup, got {tables}"
    columns = {column["name"] for column in sqlalchemy.inspect(db).get_columns("users")}
    expected = {"id", "email", "password", "full_name", "phone", "created_at", "last_modified_at"}
    assert expected <= columns, f"0: the users table needs {sorted(expected - columns)}"


def test_0_restart_keeps_the_data(app_dir, db):
    # Starting again runs create_all on a full database: it must leave the data alone.
    with TestClient(load_app(app_dir).app):
        run_sql(
            db,
            "INSERT INTO clothes (name, color, size, photo_url) "
            "VALUES ('Scarf', 'pink', 'xl', 'u')",
        )
    with TestClient(load_app(app_dir).app):
        assert len(rows(db, "SELECT id FROM clothes")) == 1, "0: a restart keeps every row"


def test_0_default_database_is_a_file_beside_the_app(app_dir, monkeypatch):
    monkeypatch.delenv("DATABASE_URL")
    with TestClient(load_app(app_dir).app):
        pass
    assert (app_dir / "clothes.db").exists(), "0: default to clothes.db beside main.py"


def test_0_dot_env_beside_the_app_is_read(app_dir, monkeypatch, tmp_path):
    (app_dir / ".env").write_text(f"DATABASE_URL=sqlite:///{tmp_path / 'from-env.db'}\n")
    monkeypatch.delenv("DATABASE_URL")
    with TestClient(load_app(app_dir).app):
        pass
    assert (tmp_path / "from-env.db").exists(), "0: read the settings in the .env beside main.py"


def test_0_dot_env_in_a_parent_folder_is_not_read(app_dir, monkeypatch, tmp_path):
    # app_dir's parent could be any folder on your disk, another project's included.
    (app_dir.parent / ".env").write_text(f"DATABASE_URL=sqlite:///{tmp_path / 'parent.db'}\n")
    monkeypatch.delenv("DATABASE_URL")
    with TestClient(load_app(app_dir).app):
        pass
    assert not (tmp_path / "parent.db").exists(), "0: read only the .env beside main.py"


# --- 1.2 Encode a token ------------------------------------------------------------


def token_for_ada(module, db):
    """create_access_token(Ada's row), read from the users table as the app reads it."""
    module.metadata.create_all(db)
    if not rows(db, "SELECT id FROM users WHERE id = 42"):
        run_sql(db, "INSERT INTO users (id, email, password) VALUES (42, 'ada@example.com', 'x')")
    [ada] = rows(db, "SELECT * FROM users WHERE id = 42")
    return module.create_access_token(ada)


@pytest.fixture
def token(app_dir, db):
    return token_for_ada(load_app(app_dir), db)


def lifetime_of(token):
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_sub": False})
    return payload["exp"] - datetime.now(timezone.utc).timestamp()


def test_1_2_token_is_hs256_with_string_sub_and_exp(token):
    assert jwt.get_unverified_header(token)["alg"] == "HS256", "1.2: sign with HS256"
    # verify_sub off: an integer sub should fail the assert below, with its advice.
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_sub": False})
    assert payload.get("sub") == "42", (
        "1.2: sub must be the user's id as a string (PyJWT 2.10+ rejects an integer), "
        f"got {payload.get('sub')!r}"
    )
    assert "exp" in payload, "1.2: the token needs an exp (expiry) claim"
    lifetime = lifetime_of(token)
    assert 120 * 60 - 60 < lifetime <= 120 * 60, (
        f"1.2: the token should expire in 120 minutes, it expires in {lifetime:.0f} s"
    )


def test_1_2_token_lifetime_comes_from_jwt_expires_minutes(app_dir, db, monkeypatch):
    monkeypatch.setenv("JWT_EXPIRES_MINUTES", "5")
    lifetime = lifetime_of(token_for_ada(load_app(app_dir), db))
    assert 5 * 60 - 60 < lifetime <= 5 * 60, (
        f"1.2: with JWT_EXPIRES_MINUTES=5 the token should live 5 minutes, not {lifetime:.0f} s"
    )


@pytest.fixture
def server_far_from_utc(monkeypatch):
    monkeypatch.setenv("TZ", "XYZ-14")  # POSIX for UTC+14: local time is 14 hours ahead
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_1_2_expiry_does_not_depend_on_the_server_timezone(server_far_from_utc, token):
    lifetime = lifetime_of(token)
    assert 120 * 60 - 60 < lifetime <= 120 * 60, (
        "1.2: compute exp from datetime.now(timezone.utc); on a server in UTC+14 "
        f"this token lives {lifetime:.0f} s"
    )


def test_1_2_no_utcnow():
    # Python 3.12 deprecates it; on 3.11 only the source shows it.
    assert not re.search(r"\butcnow\s*\(", APP_FILE.read_text()), (
        "1.2: use datetime.now(timezone.utc), not datetime.utcnow(): it is deprecated from 3.12 "
        "and returns a time that does not say it is UTC"
    )


def why_it_stopped(app_dir, capsys):
    """What the app said when it refused to start, or None if it started.

    raise SystemExit("...") says it in the exit status; refuse_to_start (13) prints it.
    """
    capsys.readouterr()
    try:
        load_app(app_dir)
    except SystemExit as stopped:
        printed = capsys.readouterr().err
        return stopped.code if isinstance(stopped.code, str) else printed
    return None


@pytest.mark.parametrize("length", [31, 32])
def test_1_2_secret_needs_32_bytes(app_dir, monkeypatch, capsys, length):
    monkeypatch.setenv("JWT_SECRET", "s" * length)
    message = why_it_stopped(app_dir, capsys)
    if length < 32:
        assert message is not None, (
            "1.2: a JWT_SECRET shorter than 32 bytes must stop the app: raise SystemExit"
        )
        assert "JWT_SECRET" in message, f"1.2: say that JWT_SECRET is too short; got {message!r}"
    else:
        assert message is None, f"1.2: 32 bytes are enough, yet the app stopped: {message!r}"


def test_1_2_dot_env_secret_is_read(app_dir, db, monkeypatch):
    env_secret = "the-secret-from-the-dot-env-file-0123456789"
    (app_dir / ".env").write_text(f"JWT_SECRET={env_secret}\n")
    monkeypatch.delenv("JWT_SECRET")
    token = token_for_ada(load_app(app_dir), db)
    assert jwt.decode(token, env_secret, algorithms=["HS256"])["sub"] == "42", (
        "1.2: sign with the JWT_SECRET of the .env beside main.py"
    )


# --- 1.3 Register returns a token ----------------------------------------------------


def test_1_3_register_answers_201_with_only_a_token(client, db):
    response = client.post("/register", json=BODY)
    expect(response, 201, "1.3")
    assert list(response.json()) in TOKEN_ANSWERS, (
        f"1.3: register returns {{'token': ...}} and nothing else, got {response.json()}"
    )
    payload = jwt.decode(response.json()["token"], SECRET, algorithms=["HS256"])
    assert payload["sub"] == str(user_id(db, "ada@example.com")), (
        "1.3: the token is for the new user: create_access_token(its row)"
    )


def test_1_3_register_stores_a_bcrypt_hash(client, db):
    register(client, phone="+359888123456")
    [user] = rows(db, "SELECT * FROM users")
    assert (user["email"], user["full_name"], user["phone"]) == (
        "ada@example.com",
        "Ada Lovelace",
        "+359888123456",
    ), "1.3: store what the user sent"
    assert user["password"] != "correct horse", "1.3: never store the password itself"
    assert CryptContext(schemes=["bcrypt"]).verify("correct horse", user["password"]), (
        "1.3: store a bcrypt hash of the password"
    )
    assert user["password"].startswith("$2b$04$"), "1.3: hash with BCRYPT_ROUNDS (4 in tests)"


def test_1_3_same_email_twice_is_409_and_keeps_the_first_user(client, db):
    register(client, password="first password")
    [before] = rows(db, "SELECT * FROM users")
    body = {"email": "ada@example.com", "password": "second password", "full_name": "Eve"}
    response = client.post("/register", json=body)
    expect(response, 409, "1.3")
    assert response.json() == {"detail": "A user with this email already exists."}, (
        f"1.3: say why: {response.json()}"
    )
    assert rows(db, "SELECT * FROM users") == [before], "1.3: the first user must stay as it was"


def test_1_3_same_email_at_once_gives_one_user(client, db):
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: client.post("/register", json=BODY), range(10)))
    codes = sorted(response.status_code for response in responses)
    # From section 12 on, a sixth 409 in a row from one address is a 429.
    assert codes[0] == 201 and set(codes[1:]) <= {409, 429}, (
        f"1.3: expected one 201 and nine 409, got {codes}"
    )
    assert len(rows(db, "SELECT id FROM users")) == 1, "1.3: one email, one user"


def expect_422_and_no_user(client, db, changes, section):
    """POST /register with each change to BODY: every one 422, and no user stored."""
    for case, change in changes.items():
        body = {**BODY, **change}
        body = {key: value for key, value in body.items() if value is not None}
        # json.dumps writes "\ud800" as an escape, as a hostile client can.
        response = client.post("/register", content=json.dumps(body), headers=JSON_HEADERS)
        expect(response, 422, f"{section} ({case})")
        assert rows(db, "SELECT id FROM users") == [], f"{section} ({case}): store nothing"


INVALID_REGISTRATIONS = {
    "bad-email": {"email": "not-an-email"},
    "no-email": {"email": None},
    "short-password": {"password": "short"},
    "73-character-password": {"password": "x" * 73},  # more than bcrypt takes
    "long-phone": {"phone": "1" * 14},  # longer than the column
    "long-name": {"full_name": "x" * 201},
    "empty-name": {"full_name": ""},
    "long-email": {"email": ("a" * 110) + "@example.com"},  # longer than the column
}


def test_1_3_invalid_registration_is_422_and_stores_nothing(client, db):
    expect_422_and_no_user(client, db, INVALID_REGISTRATIONS, "1.3")


def test_1_3_a_72_byte_password_is_accepted(client):
    register(client, password="é" * 22 + "correct horse battery staple")


def test_1_3_broken_json_is_422(client):
    response = client.post("/register", content=b'{"email": ', headers=JSON_HEADERS)
    expect(response, 422, "1.3")


def loops_during(monkeypatch, method_name):
    """Record, for each call of CryptContext.<method_name>, the event loop it ran on."""
    loops_seen = []
    real_method = getattr(CryptContext, method_name)

    def recording_method(self, *args, **kwargs):
        try:
            loops_seen.append(asyncio.get_running_loop())
        except RuntimeError:
            loops_seen.append(None)  # a worker thread: no event loop here
        return real_method(self, *args, **kwargs)

    monkeypatch.setattr(CryptContext, method_name, recording_method)
    return loops_seen


def test_1_3_hashing_runs_off_the_event_loop(client, monkeypatch):
    loops_seen = loops_during(monkeypatch, "hash")
    register(client)
    assert loops_seen == [None], (
        "1.3: hash the password in a thread (await run_in_threadpool(pwd_context.hash, ...)), "
        "or every other request waits for it"
    )


# --- 2.1 The custom HTTPBearer class -------------------------------------------------


@pytest.fixture
def probe(app_dir):
    """2.1 adds no route yet: these tests put oauth2_scheme on a route of their own."""
    source = APP_FILE.read_text()
    if "jwt.decode(" in source and "algorithms=" not in source:
        pytest.fail(
            '2.1: pass algorithms=["HS256"] to jwt.decode: without it PyJWT refuses every token',
            pytrace=False,
        )
    module = load_app(app_dir)
    scheme = module.oauth2_scheme

    @module.app.get("/checkpoint/me")
    async def me(request: Request, payload: dict = Depends(scheme)):
        user = getattr(request.state, "user", None)
        return {"sub": payload["sub"], "email": None if user is None else user["email"]}

    with TestClient(module.app) as client:
        yield client


def test_2_1_valid_token_loads_the_user(probe, db):
    register(probe, email="first@example.com")
    token = register(probe)
    response = probe.get("/checkpoint/me", headers=bearer(token))
    assert response.status_code == 200, f"2.1: a valid token was refused: {response.text}"
    assert response.json() == {
        "sub": str(user_id(db, "ada@example.com")),
        "email": "ada@example.com",
    }, (
        "2.1: return the token's payload, and put the user's row on request.state.user, "
        f"got {response.json()}"
    )


NO_BEARER = {
    "no-header": {},
    "basic": {"Authorization": "Basic YWRhOnNlY3JldA=="},
    "bare-bearer": {"Authorization": "Bearer"},
    "empty-token": {"Authorization": "Bearer "},
    "empty-header": {"Authorization": ""},
}


def test_2_1_no_bearer_token_is_401_not_authenticated(probe):
    for case, headers in NO_BEARER.items():
        response = probe.get("/checkpoint/me", headers=headers)
        expect_401(response, "Not authenticated", f"2.1 ({case})")


def test_2_1_expired_token_is_401_token_expired(probe, db):
    register(probe)
    past = datetime.now(timezone.utc) - timedelta(minutes=1)
    token = make_token({"sub": str(user_id(db, "ada@example.com")), "exp": past})
    expect_401(probe.get("/checkpoint/me", headers=bearer(token)), "Token expired.", "2.1")


BAD_TOKENS = {
    "wrong-secret": make_token(
        {"sub": "1", "exp": in_one_hour()}, key="another-secret-that-is-32-bytes-long"
    ),
    "hs512": make_token({"sub": "1", "exp": in_one_hour()}, algorithm="HS512"),
    "alg-none": jwt.encode({"sub": "1", "exp": in_one_hour()}, None, algorithm="none"),
    "no-sub": make_token({"exp": in_one_hour()}),
    "no-exp": make_token({"sub": "1"}),
    "unknown-user": make_token({"sub": "2", "exp": in_one_hour()}),
    "garbage": "not-a-jwt",
    "three-parts": "a.b.c",
    "10kB": "x" * 10_000,
}


def test_2_1_bad_token_is_401_invalid_token(probe):
    register(probe)  # user 1 exists, so only the token can be at fault
    for case, token in BAD_TOKENS.items():
        response = probe.get("/checkpoint/me", headers=bearer(token))
        expect_401(response, "Invalid token.", f"2.1 ({case})")


def test_2_1_lower_case_bearer_is_accepted(probe):
    # RFC 7235: the scheme name is case-insensitive.
    token = register(probe)
    expect(probe.get("/checkpoint/me", headers={"Authorization": f"bearer {token}"}), 200, "2.1")


def test_2_1_integer_sub_is_401_invalid_token(probe):
    # The tutorial's token: PyJWT 2.10+ refuses a sub that is not a string.
    register(probe)
    token = make_token({"sub": 1, "exp": in_one_hour()})
    expect_401(probe.get("/checkpoint/me", headers=bearer(token)), "Invalid token.", "2.1")


def test_2_1_token_of_a_deleted_user_is_401_invalid_token(probe, db):
    token = register(probe)
    run_sql(db, "DELETE FROM users")
    expect_401(probe.get("/checkpoint/me", headers=bearer(token)), "Invalid token.", "2.1")


def test_2_1_token_of_a_deleted_user_never_passes_to_a_new_user(probe, db):
    register(probe, email="first@example.com")
    token = register(probe, email="leaver@example.com")
    run_sql(db, "DELETE FROM users WHERE email = 'leaver@example.com'")
    register(probe, email="newcomer@example.com")  # must not get the leaver's id
    expect_401(probe.get("/checkpoint/me", headers=bearer(token)), "Invalid token.", "2.1")


# --- 2.2 Protect GET /clothes/ ------------------------------------------------------


def test_2_2_no_token_is_401(client):
    expect_401(client.get("/clothes/"), "Not authenticated", "2.2")


def test_2_2_valid_token_lists_clothes(client, db):
    token = register(client)
    response = client.get("/clothes/", headers=bearer(token))
    expect(response, 200, "2.2")
    assert response.json() == [], "2.2: no clothes yet, so an empty list"
    run_sql(
        db,
        "INSERT INTO clothes (name, color, size, photo_url) VALUES ('Scarf', 'pink', 'xl', 'u')",
    )
    [item] = client.get("/clothes/", headers=bearer(token)).json()
    assert {key: item[key] for key in ("name", "color", "size", "photo_url")} == {
        "name": "Scarf",
        "color": "pink",
        "size": "xl",
        "photo_url": "u",
    }
    assert datetime.fromisoformat(item["created_at"]).utcoffset() == timedelta(0), (
        f"2.2: times carry their UTC offset, got {item['created_at']!r}"
    )


def test_2_2_openapi_declares_the_bearer_scheme(client):
    schema = client.get("/openapi.json").json()
    schemes = schema.get("components", {}).get("securitySchemes")
    assert schemes == {
        "CustomHTTPBearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }, f"2.2: Swagger's Authorize button comes from this security scheme, got {schemes}"
    paths = schema["paths"]
    assert paths["/clothes/"]["get"].get("security") == [{"CustomHTTPBearer": []}], (
        "2.2: GET /clothes/ depends on oauth2_scheme"
    )
    assert "security" not in paths["/register"]["post"], "1.3: register needs no token"


# --- 3.1 The role column --------------------------------------------------------------


def test_3_1_role_defaults_to_user_in_the_database(client, db):
    # Even a row written without the app gets the role "user".
    run_sql(db, "INSERT INTO users (email, password) VALUES ('raw@example.com', 'x')")
    [user] = rows(db, "SELECT role FROM users")
    assert user["role"] == "user", "3.1: the role column needs server_default 'user'"


def test_3_1_register_gives_the_role_user(client, db):
    register(client)
    [user] = rows(db, "SELECT role FROM users")
    assert user["role"] == "user", "3.1: a new user gets the role 'user'"


def test_3_1_a_role_in_the_body_is_ignored(client, db):
    register(client, role="super_admin")
    [user] = rows(db, "SELECT role FROM users")
    assert user["role"] == "user", "3.1: nobody may make themselves an admin by registering"


# --- 3.2 The is_admin dependency ------------------------------------------------------


@pytest.mark.parametrize("role, status_code", [("super_admin", 201), ("admin", 201), ("user", 403)])
def test_3_2_the_app_reads_each_role(client, db, role, status_code):
    token = register(client)
    set_role(db, "ada@example.com", role)
    response = client.post("/clothes/", json=SHIRT, headers=bearer(token))
    expect(response, status_code, f"3.2: the role {role!r}, read back as a UserRolesEnum")


def test_3_2_restart_keeps_users_and_their_tokens(app_dir, db):
    # Starting again runs create_all on a full database: it must leave the data alone.
    with TestClient(load_app(app_dir).app) as client:
        token = register(client)
        set_role(db, "ada@example.com", "admin")
        expect(client.post("/clothes/", json=SHIRT, headers=bearer(token)), 201, "3.2")
    with TestClient(load_app(app_dir).app) as client:
        response = client.get("/clothes/", headers=bearer(token))
        expect(response, 200, "3.2: a token from before the restart still works")
        assert [item["name"] for item in response.json()] == ["Linen shirt"]
        expect(client.post("/clothes/", json=SHIRT, headers=bearer(token)), 201, "3.2")
    assert len(rows(db, "SELECT id FROM users")) == 1


def test_3_2_plain_user_cannot_add_clothes(client, db):
    token = register(client)
    response = client.post("/clothes/", json=SHIRT, headers=bearer(token))
    expect(response, 403, "3.2")
    assert response.json() == {"detail": "You do not have permissions for this resource"}
    assert "www-authenticate" not in response.headers, (
        "3.2: 403 means 'you are known but not allowed': no WWW-Authenticate"
    )
    assert rows(db, "SELECT id FROM clothes") == []


def test_3_2_no_token_on_post_is_401_not_403(client):
    expect_401(client.post("/clothes/", json=SHIRT), "Not authenticated", "3.2")


@pytest.mark.parametrize("role", ["admin", "super_admin"])
def test_3_2_admins_add_clothes(client, db, role):
    # Other users and clothes first, so no id matches another table's by luck.
    register(client, email="first@example.com")
    register(client, email="second@example.com")
    token = register(client)
    set_role(db, "ada@example.com", role)
    run_sql(
        db,
        "INSERT INTO clothes (name, color, size, photo_url) VALUES ('Scarf', 'pink', 'xl', 'u')",
    )
    response = client.post("/clothes/", json=SHIRT, headers=bearer(token))
    expect(response, 201, "3.2")
    body = response.json()
    [row] = rows(db, "SELECT id, name FROM clothes WHERE name = 'Linen shirt'")
    assert body["id"] == row["id"] and body["name"] == "Linen shirt", (
        "3.2: return the new clothes row (read it back with clothes.c.id, not users.c.id)"
    )
    assert {key: body[key] for key in SHIRT} == SHIRT
    for key in ("created_at", "last_modified_at"):
        assert RFC_3339.fullmatch(body[key]), (
            f"3.2: {key} should be an RFC 3339 time with its offset, got {body[key]!r}"
        )
        moment = datetime.fromisoformat(body[key])
        assert abs(moment - datetime.now(timezone.utc)) < timedelta(minutes=5), (
            f"3.2: {key} should be now in UTC, got {body[key]!r}"
        )


def test_3_2_role_is_read_from_the_database_on_every_request(client, db):
    token = register(client)
    set_role(db, "ada@example.com", "admin")
    expect(client.post("/clothes/", json=SHIRT, headers=bearer(token)), 201, "3.2")
    set_role(db, "ada@example.com", "user")
    response = client.post("/clothes/", json=SHIRT, headers=bearer(token))
    expect(response, 403, "3.2: a demoted admin is refused with the same token")
    assert len(rows(db, "SELECT id FROM clothes")) == 1, "3.2: the refused request adds nothing"


def admin_token(client, db):
    token = register(client)
    set_role(db, "ada@example.com", "admin")
    return token


def expect_422_and_no_clothes(client, db, changes, section):
    """POST /clothes/ as an admin with each change to SHIRT: every one 422, nothing stored."""
    token = admin_token(client, db)
    for case, change in changes.items():
        body = {**SHIRT, **change}
        body = {key: value for key, value in body.items() if value is not None}
        response = client.post(
            "/clothes/", content=json.dumps(body), headers={**JSON_HEADERS, **bearer(token)}
        )
        expect(response, 422, f"{section} ({case})")
        assert rows(db, "SELECT id FROM clothes") == [], f"{section} ({case}): store nothing"


INVALID_CLOTHES = {
    "bad-size": {"size": "xxxl"},
    "bad-color": {"color": "green"},
    "no-name": {"name": None},
    "empty-name": {"name": ""},
    "long-name": {"name": "x" * 121},
    "long-photo-url": {"photo_url": "https://example.com/" + "x" * 250},
}


def test_3_2_invalid_clothes_are_422(client, db):
    expect_422_and_no_clothes(client, db, INVALID_CLOTHES, "3.2")


def test_3_2_openapi_shows_that_adding_clothes_needs_a_token(client):
    post = client.get("/openapi.json").json()["paths"]["/clothes/"].get("post")
    assert post, "3.2: add the POST /clothes/ route"
    assert post.get("security") == [{"CustomHTTPBearer": []}], (
        "3.2: POST /clothes/ depends on is_admin, which depends on oauth2_scheme"
    )


# --- 4 Logging in -----------------------------------------------------------------------


def test_4_login_returns_a_working_token(client):
    register(client)
    response = client.post("/login", json={"email": "ada@example.com", "password": "correct horse"})
    expect(response, 200, "4")
    token = response.json()["token"]
    expect(client.get("/clothes/", headers=bearer(token)), 200, "4: the login token works")


@pytest.mark.parametrize(
    "credentials",
    [
        {"email": "ada@example.com", "password": "wrong horse"},
        {"email": "nobody@example.com", "password": "correct horse"},
    ],
    ids=["wrong-password", "unknown-email"],
)
def test_4_bad_login_is_one_and_the_same_401(client, credentials):
    register(client)
    expect_401(client.post("/login", json=credentials), "Incorrect email or password.", "4")


def test_4_login_token_belongs_to_that_user(client, db):
    register(client, email="first@example.com")
    register(client)
    response = client.post("/login", json={"email": "ada@example.com", "password": "correct horse"})
    expect(response, 200, "4")
    payload = jwt.decode(response.json()["token"], SECRET, algorithms=["HS256"])
    assert payload["sub"] == str(user_id(db, "ada@example.com")), (
        "4: the token's sub is the id of the user who logged in"
    )


@pytest.mark.parametrize(
    "email", ["ada@example.com", "nobody@example.com"], ids=["known-email", "unknown-email"]
)
def test_4_login_checks_one_password_off_the_event_loop(client, monkeypatch, email):
    # An unknown email costs one check too (of a dummy hash): the timing tells nothing.
    register(client)
    loops_seen = loops_during(monkeypatch, "verify")
    client.post("/login", json={"email": email, "password": "wrong horse"})
    assert loops_seen == [None], (
        "4: check the password (or, for an unknown email, a dummy hash) exactly once, "
        f"in a thread (run_in_threadpool), not on the event loop; seen {loops_seen}"
    )


INVALID_LOGINS = {
    "no-password": {"email": "ada@example.com"},
    "no-email": {"password": "correct horse"},
    "bad-email": {"email": "ada", "password": "correct horse"},
    "100-character-password": {"email": "ada@example.com", "password": "x" * 100},
}


def test_4_invalid_login_body_is_422(client):
    # A password bcrypt cannot take must be refused before it reaches bcrypt (a 500).
    register(client)
    for case, body in INVALID_LOGINS.items():
        expect(client.post("/login", json=body), 422, f"4 ({case})")


# --- 5 Making an admin -------------------------------------------------------------------


def test_5_set_role_on_the_command_line_makes_an_admin(app_dir, db):
    with TestClient(load_app(app_dir).app) as client:
        token = register(client)
        # The real command line, as the lesson shows it.
        result = subprocess.run(
            [sys.executable, "main.py", "set-role", "ada@example.com", "admin"],
            cwd=app_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"5: set-role failed: {result.stderr[-1000:]}"
        assert "ada@example.com is now admin." in result.stdout, (
            "5: `python main.py set-role` did nothing: end the file with main() and "
            f'`if __name__ == "__main__": main()`; it printed {result.stdout!r}'
        )
        [user] = rows(db, "SELECT role FROM users")
        assert user["role"] == "admin", "5: set-role stores the new role"
        created = client.post("/clothes/", json=SHIRT, headers=bearer(token))
        expect(created, 201, "5: the new admin adds clothes with the token from before")


def run_command(app_dir, monkeypatch, *args, password="admin password"):
    """What `python main.py ARGS` does, in this process: quicker than a subprocess."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    load_app(app_dir).main(list(args))


def test_5_set_role_changes_an_existing_user(app_dir, db, monkeypatch, capsys):
    with TestClient(load_app(app_dir).app) as client:
        token = register(client)
        run_command(app_dir, monkeypatch, "set-role", "ada@example.com", "super_admin")
        assert "ada@example.com is now super_admin." in capsys.readouterr().out
        expect(client.post("/clothes/", json=SHIRT, headers=bearer(token)), 201, "5")
    [user] = rows(db, "SELECT role FROM users")
    assert user["role"] == "super_admin"


def test_5_set_role_of_an_unknown_email_fails_clearly(app_dir, monkeypatch):
    with pytest.raises(SystemExit, match="No user with email nobody@example.com."):
        run_command(app_dir, monkeypatch, "set-role", "nobody@example.com", "admin")


def test_5_set_role_works_before_the_server_ever_ran(app_dir, db, monkeypatch):
    # A fresh clone: no tables yet. The command makes them, then finds nobody.
    with pytest.raises(SystemExit, match="No user with email"):
        run_command(app_dir, monkeypatch, "set-role", "ada@example.com", "admin")
    assert "users" in sqlalchemy.inspect(db).get_table_names(), "5: main() creates the tables"


def test_5_unknown_role_is_refused(app_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_command(app_dir, monkeypatch, "set-role", "ada@example.com", "owner")
    assert stopped.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- 6 Log out and change the password ----------------------------------------------------


def login(client, password="correct horse"):
    response = client.post("/login", json={"email": "ada@example.com", "password": password})
    expect(response, 200, "4 login")
    return response.json()["token"]


def version_of_ada(db):
    return rows(db, "SELECT token_version FROM users WHERE email = 'ada@example.com'")[0][
        "token_version"
    ]


def change_password(client, token, new_password="battery staple", old="correct horse"):
    body = {"old_password": old, "new_password": new_password}
    return client.post("/password", json=body, headers=bearer(token))


def test_6_logout_revokes_every_token_of_the_user(client, db):
    register(client)
    phone, laptop = login(client), login(client)
    expect(client.get("/clothes/", headers=bearer(phone)), 200, "6")
    response = client.post("/logout", headers=bearer(phone))
    expect(response, 204, "6")
    assert response.content == b"", "6: a 204 has no body"
    for token in (phone, laptop):
        expect_401(client.get("/clothes/", headers=bearer(token)), "Token revoked.", "6")
    assert version_of_ada(db) == 1, "6: logout adds one to token_version"
    expect(client.get("/clothes/", headers=bearer(login(client))), 200, "6: log in again")


def test_6_logout_needs_a_token(client):
    expect_401(client.post("/logout"), "Not authenticated", "6")


def test_6_a_token_without_a_version_is_refused(client, db):
    register(client)
    token = make_token({"sub": str(user_id(db, "ada@example.com")), "exp": in_one_hour()})
    response = client.get("/clothes/", headers=bearer(token))
    expect(response, 401, "6: a token without the version claim")


def test_6_logouts_at_once_all_count(client, db):
    # The increment happens in SQL: logouts that passed the token check at once lose nothing.
    register(client)
    tokens = [login(client) for _ in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(
            pool.map(lambda t: client.post("/logout", headers=bearer(t)).status_code, tokens)
        )
    assert set(codes) <= {204, 401}, f"6: each logout answers 204 or 401, got {codes}"
    assert version_of_ada(db) == codes.count(204), (
        f"6: {codes.count(204)} logouts answered 204 but token_version is {version_of_ada(db)}: "
        "count up in SQL (token_version = token_version + 1)"
    )


def test_6_password_change_returns_a_token_and_revokes_the_old_ones(client, db):
    register(client)
    old = login(client)
    response = change_password(client, old)
    expect(response, 200, "6")
    assert list(response.json()) in TOKEN_ANSWERS, (
        f"6: answer {{'token': ...}}, got {response.json()}"
    )
    expect(client.get("/clothes/", headers=bearer(response.json()["token"])), 200, "6")
    expect_401(client.get("/clothes/", headers=bearer(old)), "Token revoked.", "6")
    wrong = client.post("/login", json={"email": "ada@example.com", "password": "correct horse"})
    expect_401(wrong, "Incorrect email or password.", "6: the old password no longer logs in")
    login(client, password="battery staple")


def test_6_wrong_old_password_is_400_and_changes_nothing(client, db):
    token = register(client)
    [before] = rows(db, "SELECT * FROM users")
    response = change_password(client, token, old="wrong horse")
    expect(response, 400, "6")
    assert response.json() == {"detail": "Incorrect password."}
    assert rows(db, "SELECT * FROM users") == [before], "6: a refused change changes nothing"
    expect(client.get("/clothes/", headers=bearer(token)), 200, "6: the token still works")


def test_6_new_password_is_checked_like_at_register(client, db):
    token = register(client)
    [before] = rows(db, "SELECT * FROM users")
    for case, new_password in {"short": "short", "73-character": "x" * 73}.items():
        response = change_password(client, token, new_password)
        expect(response, 422, f"6 ({case}): a NewPassword, as at register")
        assert rows(db, "SELECT * FROM users") == [before], f"6 ({case}): nothing changes"


def hashing_waits_for(monkeypatch, step):
    """While /password hashes its new password, run step() first: a request racing it."""
    real_hash = CryptContext.hash

    def hash_after_step(self, secret, **kwargs):
        step()
        return real_hash(self, secret, **kwargs)

    monkeypatch.setattr(CryptContext, "hash", hash_after_step)


def test_6_two_password_changes_at_once_with_one_token_one_wins(client, db, monkeypatch):
    token = register(client)
    # Both requests pass the token check before either writes: the race the issue saw.
    both_hashing = threading.Barrier(2, timeout=10)
    hashing_waits_for(monkeypatch, both_hashing.wait)

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(
            pool.map(
                lambda new: change_password(client, token, new), ["battery staple", "tr0ub4dor&3"]
            )
        )
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200, 401], (
        "6: of two changes with one token exactly one wins: update only WHERE token_version "
        f"is still the token's, and answer 401 when no row changed; got {codes}"
    )
    [winner] = [answer for answer in answers if answer.status_code == 200]
    [loser] = [answer for answer in answers if answer.status_code == 401]
    assert loser.json() == {"detail": "Token revoked."}
    expect(client.get("/clothes/", headers=bearer(winner.json()["token"])), 200, "6")
    assert version_of_ada(db) == 1, "6: only the winner's change was written"
    won = "battery staple" if answers[0].status_code == 200 else "tr0ub4dor&3"
    login(client, password=won)


def test_6_a_change_overtaken_by_a_logout_changes_nothing(client, db, monkeypatch):
    token = register(client)
    [before] = rows(db, "SELECT password FROM users")
    logged_out = []
    hashing_waits_for(
        monkeypatch, lambda: logged_out.append(client.post("/logout", headers=bearer(token)))
    )
    response = change_password(client, token)
    assert [answer.status_code for answer in logged_out] == [204]
    expect_401(response, "Token revoked.", "6: a logout answered 204 while the change hashed")
    assert rows(db, "SELECT password FROM users") == [before], "6: the password stays"
    login(client)  # the old password still logs in


def test_6_password_change_hashes_off_the_event_loop(client, monkeypatch):
    token = register(client)
    verified, hashed = loops_during(monkeypatch, "verify"), loops_during(monkeypatch, "hash")
    expect(change_password(client, token), 200, "6")
    assert verified == [None] and hashed == [None], (
        "6: check the old password and hash the new one in a thread (run_in_threadpool, "
        f"as in 1.3); seen {verified} and {hashed}"
    )


def test_6_logout_command_revokes_a_stolen_token(app_dir, db, monkeypatch, capsys):
    with TestClient(load_app(app_dir).app) as client:
        token = register(client)
        run_command(app_dir, monkeypatch, "logout", "ada@example.com")
        assert "ada@example.com" in capsys.readouterr().out
        expect_401(client.get("/clothes/", headers=bearer(token)), "Token revoked.", "6")


def test_6_logout_command_names_an_unknown_email(app_dir, monkeypatch):
    with pytest.raises(SystemExit, match="No user with email nobody@example.com."):
        run_command(app_dir, monkeypatch, "logout", "nobody@example.com")


def test_6_openapi_lists_both_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    logout, password = paths.get("/logout", {}).get("post"), paths.get("/password", {}).get("post")
    assert logout and password, "6: add POST /logout and POST /password"
    for name, operation in (("/logout", logout), ("/password", password)):
        assert operation.get("security") == [{"CustomHTTPBearer": []}], (
            f"6: {name} needs a token: dependencies=[Depends(oauth2_scheme)]"
        )
    assert "204" in logout["responses"], "6: a logout answers 204 No Content"
    assert password["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TokenOut"
    }, "6: /password answers a TokenOut (response_model=TokenOut)"


# --- 7 Slow down password guessing ---------------------------------------------------------


WRONG = {"email": "ada@example.com", "password": "wrong horse"}
RIGHT = {"email": "ada@example.com", "password": "correct horse"}


def reflected(db, table):
    return sqlalchemy.Table(table, sqlalchemy.MetaData(), autoload_with=db)


def hashes_counted(monkeypatch):
    """Count every password check (verify and dummy_verify) the app makes."""
    calls = []
    for name in ("verify", "dummy_verify"):
        real = getattr(CryptContext, name)

        def counting(self, *args, real=real, **kwargs):
            calls.append(1)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(CryptContext, name, counting)
    return calls


def expect_429(response, section="7"):
    expect(response, 429, section)
    seconds = response.headers.get("retry-after", "")
    assert seconds.isdigit() and int(seconds) >= 1, f"{section}: 429 needs Retry-After seconds"
    assert response.json() == {"detail": f"Too many failed logins: try again in {seconds} s."}, (
        f"{section}: got {response.json()}"
    )
    return int(seconds)


def failures(db, pairs, seconds_ago=0):
    """Put one failed login for each (email, address) into failed_logins, as if it happened."""
    table = reflected(db, "failed_logins")
    when = time.time() - seconds_ago
    with db.begin() as connection:
        connection.execute(
            table.insert(),
            [{"email": email, "address": address, "failed_at": when} for email, address in pairs],
        )


def failed_logins(db, columns="*"):
    """The rows of failed_logins that are failures: from section 12 on, the table also counts
    each sign-up against its address, under a name that is no email."""
    return rows(db, f"SELECT {columns} FROM failed_logins WHERE email LIKE '%@%'")


@pytest.mark.parametrize("email", ["ada@example.com", "nobody@example.com"])
def test_7_after_five_failures_in_a_row_429_with_no_hash(client, monkeypatch, email):
    register(client)
    for _ in range(5):
        expect_401(
            client.post("/login", json={**WRONG, "email": email}),
            "Incorrect email or password.",
            "7",
        )
    checks = hashes_counted(monkeypatch)
    waited = expect_429(client.post("/login", json={**RIGHT, "email": email}))
    assert waited == 1, "7: 1 second after the 5th failure in a row"
    assert checks == [], "7: check the throttle before any hash (check_throttle first)"


def test_7_a_stolen_token_guesses_old_passwords_no_faster_than_login(client, db):
    # A thief with Ada's token tries old passwords at /password: each wrong one is a failure.
    token = register(client)
    for _ in range(5):
        expect(change_password(client, token, old="wrong horse"), 400, "7")
    expect_429(change_password(client, token), "7: a wrong old password counts as a failed login")
    expect_429(client.post("/login", json=RIGHT), "7: the same throttle as /login")
    run_sql(db, "UPDATE failed_logins SET failed_at = failed_at - 60")  # the wait is over
    expect(change_password(client, token), 200, "7: then the right old password gets through")
    assert failed_logins(db) == [], "7: and clears that pair's failures"


def test_7_guesses_sent_at_once_all_count(client, db):
    register(client)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: client.post("/login", json=WRONG), range(20)))
    codes = [answer.status_code for answer in answers]
    assert codes.count(401) <= 5 and set(codes) <= {401, 429}, (
        "7: guesses at once must see each other: write the attempt down before the hash and "
        f"check in the same transaction (claim_attempt); got {sorted(codes)}"
    )
    assert len(failed_logins(db, "id")) == codes.count(401), (
        "7: each checked guess leaves one row, each refused one none"
    )


def test_7_a_client_address_always_fits_its_column(app_dir):
    # Behind a proxy it comes from X-Forwarded-For, which can hold anything: a 500 on
    # PostgreSQL if it were longer than the column.
    request = types.SimpleNamespace(client=types.SimpleNamespace(host="203.0.113.7, " * 20))
    assert len(load_app(app_dir).client_address(request)) == 45


def test_7_the_wait_doubles_with_each_failure(client, db):
    register(client)
    failures(db, [("ada@example.com", "testclient")] * 8)
    assert expect_429(client.post("/login", json=RIGHT)) == 8, "7: 2 ** (8 - 5) seconds"
    failures(db, [("ada@example.com", "testclient")] * 92)
    assert expect_429(client.post("/login", json=RIGHT)) in (899, 900), "7: at most 15 minutes"


def test_7_the_right_password_clears_the_failures_in_a_row(client, db):
    register(client)
    failures(db, [("ada@example.com", "testclient")] * 4)
    expect(client.post("/login", json=RIGHT), 200, "7: 4 failures leave the right password in")
    for _ in range(4):
        expect(client.post("/login", json=WRONG), 401, "7: the count started again")
    expect(client.post("/login", json=RIGHT), 200, "7")
    assert failed_logins(db) == [], "7: a success forgets that pair"


def test_7_the_owner_logs_in_while_another_address_guesses(client, db):
    register(client)
    failures(db, [("ada@example.com", "203.0.113.9")] * 50)
    expect(client.post("/login", json=RIGHT), 200, "7: failures from elsewhere do not lock Ada out")


def a_stranger_here(db):
    """Ada, on a device that has never logged in from this address."""
    run_sql(db, "DELETE FROM known_logins")


def test_7_at_most_100_failures_an_hour_for_one_account(client, db):
    register(client)
    a_stranger_here(db)
    failures(db, [("ada@example.com", f"203.0.113.{n}") for n in range(100)], seconds_ago=600)
    waited = expect_429(client.post("/login", json=RIGHT))
    assert 2990 <= waited <= 3000, "7: until the oldest failure is an hour old"
    run_sql(db, "UPDATE failed_logins SET failed_at = failed_at - 3000")
    expect(client.post("/login", json=RIGHT), 200, "7: an hour later the account is open again")


def test_7_at_most_100_failures_an_hour_from_one_address(client, db):
    register(client)
    a_stranger_here(db)
    failures(db, [(f"user{number}@example.com", "testclient") for number in range(100)])
    expect_429(client.post("/login", json=RIGHT))


def test_7_a_known_login_is_not_locked_out_by_the_caps(client, db):
    # Someone fails 100 times for Ada from elsewhere, and a prankster in her classroom 100
    # times for made-up emails: Ada, who has logged in from the classroom before, gets in.
    register(client)
    login(client)  # from the classroom, before the attacks
    failures(db, [("ada@example.com", f"203.0.113.{n}") for n in range(100)])
    failures(db, [(f"made-up{n}@example.com", "testclient") for n in range(100)])
    expect(client.post("/login", json=RIGHT), 200, "7: a known login skips both caps")
    assert rows(db, "SELECT email, address FROM known_logins") == [
        {"email": "ada@example.com", "address": "testclient"}
    ], "7: remember_login keeps each email and address that logged in"
    for _ in range(5):
        expect(client.post("/login", json=WRONG), 401, "7")
    expect_429(client.post("/login", json=RIGHT), "7: its own failures in a row still count")


@pytest.mark.parametrize(
    "spellings, same",
    [
        (["2001:db8::1", "2001:DB8::1", "2001:0db8:0000::0001", "2001:db8::ffff:1"], True),
        (["2001:db8::1", "2001:db8:0:1::1"], False),
        (["203.0.113.7", "203.0.113.8"], False),
        (["::ffff:203.0.113.7", "203.0.113.7"], True),  # IPv4, to a server on IPv6
        (["::ffff:203.0.113.7", "::ffff:203.0.113.8"], False),
    ],
)
def test_7_an_ipv6_64_is_one_address(app_dir, spellings, same):
    module = load_app(app_dir)
    seen = {
        module.client_address(types.SimpleNamespace(client=types.SimpleNamespace(host=host)))
        for host in spellings
    }
    assert (len(seen) == 1) == same, f"7: client_address gave {seen} for {spellings}"


def test_7_a_classroom_behind_one_address_logs_in(client, db):
    register(client)
    # 30 students, each with Ada's password hash: quicker than 30 registrations.
    emails = [f"student{number}@example.com" for number in range(30)]
    run_sql(db, "UPDATE users SET email = :email", email=emails[0])
    for email in emails[1:]:
        run_sql(
            db,
            "INSERT INTO users (email, password, full_name) "
            "SELECT :email, password, full_name FROM users WHERE id = 1",
            email=email,
        )
    failures(db, [("ada@example.com", "testclient")] * 4)  # one student kept mistyping
    for email in emails:
        response = client.post("/login", json={"email": email, "password": "correct horse"})
        expect(response, 200, "7: only failures count, never logins")


def test_7_failures_older_than_an_hour_are_purged(client, db):
    register(client)
    failures(db, [("eve@example.com", "203.0.113.1")] * 3, seconds_ago=3700)
    expect(client.post("/login", json=WRONG), 401, "7")
    assert [row["email"] for row in failed_logins(db, "email")] == ["ada@example.com"], (
        "7: claim_attempt deletes the rows more than an hour old"
    )


def test_7_common_passwords_are_refused(client, db):
    for password in ["password", "12345678", " " * 8, "qwertyuiop"]:
        response = client.post("/register", json={**BODY, "password": password})
        section = f"7 ({password!r})"
        expect(response, 422, f"{section}: refuse what zxcvbn scores below 2 (is_easy_to_guess)")
        assert "too common or too easy to guess" in response.text, f"{section}: name the rule"
        assert [problem.get("input") for problem in response.json()["detail"]] == [None], (
            f"{section}: never repeat the refused password"
        )
        assert rows(db, "SELECT id FROM users") == [], f"{section}: store nothing"


def test_7_a_common_password_is_refused_as_a_new_password(client, db):
    token = register(client)
    [before] = rows(db, "SELECT * FROM users")
    response = change_password(client, token, "password1")
    expect(response, 422, "7: /password checks the new password too (refuse_easy_password)")
    assert "too common or too easy to guess" in response.text, "7: name the rule"
    assert rows(db, "SELECT * FROM users") == [before], "7: nothing changes"


def test_7_zxcvbn_runs_off_the_event_loop_on_32_characters(app_dir, monkeypatch):
    module = load_app(app_dir)
    seen = []

    def recording_zxcvbn(password):
        try:
            seen.append((asyncio.get_running_loop(), password))
        except RuntimeError:
            seen.append((None, password))  # a worker thread: no event loop here
        return {"score": 4}

    patch_app(monkeypatch, module, "zxcvbn", recording_zxcvbn)
    password = "4@8(<{[369!|17+05$%2" * 3  # zxcvbn's l33t matching takes a second on it
    with TestClient(module.app) as client:
        register(client, password=password)
    assert seen == [(None, password[:32])], (
        "7: zxcvbn can take a second on some passwords: run it in a thread, like a hash, "
        f"on the first 32 characters; seen {seen}"
    )


# --- 8 Refresh tokens --------------------------------------------------------------------


def log_in_for_a_pair(client, password="correct horse"):
    response = client.post("/login", json={"email": "ada@example.com", "password": password})
    expect(response, 200, "8 login")
    assert list(response.json()) == ["token", "refresh_token"], (
        f"8: login answers a token and a refresh_token, got {list(response.json())}"
    )
    return response.json()


def refresh(client, refresh_token):
    return client.post("/refresh", json={"refresh_token": refresh_token})


def refresh_rows(db):
    return rows(db, "SELECT * FROM refresh_tokens ORDER BY id")


def test_8_refresh_gives_a_new_pair_and_spends_the_old_token(client):
    register(client)
    pair = log_in_for_a_pair(client)
    response = refresh(client, pair["refresh_token"])
    expect(response, 200, "8")
    new = response.json()
    assert list(new) == ["token", "refresh_token"], f"8: answer a new pair, got {list(new)}"
    assert new["refresh_token"] != pair["refresh_token"], "8: every refresh makes a new token"
    expect(client.get("/clothes/", headers=bearer(new["token"])), 200, "8: the new access token")
    expect(refresh(client, new["refresh_token"]), 200, "8: the new refresh token works once")


def test_8_register_and_password_change_give_a_pair_too(client):
    answer = client.post("/register", json=BODY).json()
    expect(refresh(client, answer["refresh_token"]), 200, "8: register's refresh token")
    response = change_password(client, log_in_for_a_pair(client)["token"])
    expect(response, 200, "8")
    expect(refresh(client, response.json()["refresh_token"]), 200, "8: the new password's pair")


def test_8_the_database_keeps_only_a_sha256_of_each_token(client, db, database_url):
    register(client)
    pair = log_in_for_a_pair(client)
    stored = [row for row in refresh_rows(db) if pair["refresh_token"] not in str(dict(row))]
    assert len(stored) == len(refresh_rows(db)), "8: never store the refresh token itself"
    hashes = {row["token_hash"] for row in stored}
    assert hashlib.sha256(pair["refresh_token"].encode()).hexdigest() in hashes, (
        "8: store hashlib.sha256(token).hexdigest()"
    )
    assert len(pair["refresh_token"]) >= 43, "8: at least 32 random bytes (secrets.token_urlsafe)"
    if database_url.startswith("sqlite"):
        # The database file, and whatever SQLite keeps beside it (its WAL file, from 13).
        database_file = Path(database_url.removeprefix("sqlite:///"))
        for file in database_file.parent.glob(database_file.name + "*"):
            assert pair["refresh_token"].encode() not in file.read_bytes(), f"8: not in {file}"


def test_8_a_spent_token_that_comes_back_ends_its_family(client, db, caplog):
    register(client)
    other_device = log_in_for_a_pair(client)
    first = log_in_for_a_pair(client)
    second = refresh(client, first["refresh_token"]).json()
    # Whoever copied `first` tries it now: thief or owner, the family ends.
    again = refresh(client, first["refresh_token"])
    expect_401(again, "Refresh token already used: log in again.", "8")
    expect_401(refresh(client, second["refresh_token"]), "Refresh token revoked.", "8")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "family" in warnings[0], f"8: log one warning, got {warnings}"
    assert first["refresh_token"] not in warnings[0], "8: never log the token"
    expect(refresh(client, other_device["refresh_token"]), 200, "8: other logins go on")


def test_8_a_successor_stored_as_its_family_ended_is_refused(client, db):
    # On PostgreSQL a refresh in flight can store its successor just after the UPDATE that
    # ended the family has looked: that row is not marked, and must be refused all the same.
    register(client)
    first = log_in_for_a_pair(client)
    second = refresh(client, first["refresh_token"]).json()
    expect(refresh(client, first["refresh_token"]), 401, "8: the reuse")
    run_sql(db, "UPDATE refresh_tokens SET family_ended_at = NULL WHERE spent_at IS NULL")
    expect_401(refresh(client, second["refresh_token"]), "Refresh token revoked.", "8")


def test_8_refreshes_at_once_with_one_token_one_wins(client):
    register(client)
    pair = log_in_for_a_pair(client)
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: refresh(client, pair["refresh_token"]), range(10)))
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] + [401] * 9, (
        "8: spend the token in one conditional UPDATE (WHERE spent_at IS NULL ... RETURNING), "
        f"so that of ten refreshes at once exactly one wins; got {codes}"
    )


@pytest.mark.parametrize("how", ["logout", "password", "command"])
def test_8_logging_out_ends_every_refresh_token(app_dir, db, monkeypatch, how):
    with TestClient(load_app(app_dir).app) as client:
        register(client)
        phone = log_in_for_a_pair(client)
        laptop = refresh(client, log_in_for_a_pair(client)["refresh_token"]).json()
        if how == "logout":
            expect(client.post("/logout", headers=bearer(phone["token"])), 204, "8")
        elif how == "password":
            expect(change_password(client, phone["token"]), 200, "8")
        else:
            run_command(app_dir, monkeypatch, "logout", "ada@example.com")
        for device in (phone, laptop):
            expect_401(refresh(client, device["refresh_token"]), "Refresh token revoked.", "8")
            expect_401(
                client.get("/clothes/", headers=bearer(device["token"])), "Token revoked.", "8"
            )


@pytest.mark.parametrize("column", ["expires_at", "family_expires_at"])
def test_8_an_expired_refresh_token_is_refused(client, db, column):
    register(client)
    pair = log_in_for_a_pair(client)
    table = reflected(db, "refresh_tokens")
    with db.begin() as connection:
        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        connection.execute(table.update().values({column: past}))
    expect_401(refresh(client, pair["refresh_token"]), "Refresh token expired: log in again.", "8")


def test_8_rotation_cannot_outlive_the_session(client, db):
    register(client)
    token = log_in_for_a_pair(client)["refresh_token"]
    for _ in range(3):
        token = refresh(client, token).json()["refresh_token"]
    family = {(row["family"], row["family_expires_at"]) for row in refresh_rows(db)[-4:]}
    assert len(family) == 1, "8: a refreshed token keeps its family and the family's expiry"


def test_8_expired_sessions_are_purged(client, db):
    register(client)
    log_in_for_a_pair(client)
    table = reflected(db, "refresh_tokens")
    with db.begin() as connection:
        past = datetime.now(timezone.utc) - timedelta(days=1)
        connection.execute(table.update().values(family_expires_at=past))
    before = len(refresh_rows(db))
    log_in_for_a_pair(client)
    assert before == 2 and len(refresh_rows(db)) == 1, "8: each new session deletes expired ones"


def test_8_an_unknown_refresh_token_is_refused(client):
    register(client)
    pair = log_in_for_a_pair(client)
    for case, sent in {
        "garbage": "not-a-token",
        "unknown": "x" * 43,
        "access": pair["token"],
    }.items():
        expect_401(refresh(client, sent), "Invalid refresh token.", f"8 ({case})")


def test_8_a_deleted_users_refresh_token_is_refused(client, db):
    register(client)
    pair = log_in_for_a_pair(client)
    run_sql(db, "DELETE FROM users")
    expect_401(refresh(client, pair["refresh_token"]), "Invalid refresh token.", "8")


def test_8_a_refresh_token_is_no_bearer_token(client):
    register(client)
    pair = log_in_for_a_pair(client)
    response = client.get("/clothes/", headers=bearer(pair["refresh_token"]))
    expect_401(response, "Invalid token.", "8")


def test_8_openapi_lists_refresh_without_a_bearer(client):
    operation = client.get("/openapi.json").json()["paths"].get("/refresh", {}).get("post")
    assert operation, "8: add POST /refresh"
    assert "security" not in operation, "8: /refresh takes the refresh token in its body"
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TokenOut"
    }, "8: /refresh answers a TokenOut (response_model=TokenOut)"


# --- 9 A password in an error message -----------------------------------------------------


def refused_password(client, route, token=None):
    """A password each route refuses with 422, and the answer; it never comes back."""
    password = "never-show-me-" * 6  # 84 characters: too long for every route
    bodies = {
        "/register": {**BODY, "password": password},
        "/login": {"email": "ada@example.com", "password": password},
        "/password": {"old_password": "correct horse", "new_password": password},
    }
    headers = bearer(token) if token else {}
    return password, client.post(route, json=bodies[route], headers=headers)


@pytest.mark.parametrize("route", ["/register", "/login", "/password"])
def test_9_a_422_does_not_repeat_the_password(client, route):
    token = register(client) if route == "/password" else None
    password, response = refused_password(client, route, token)
    expect(response, 422, "9")
    assert "never-show-me" not in response.text, (
        f"9: a 422 must not repeat the password it refused: {response.text[:300]}"
    )
    assert all("input" not in problem for problem in response.json()["detail"]), (
        "9: drop each problem's input (the RequestValidationError handler)"
    )


def test_9_a_422_still_says_what_is_wrong(client):
    response = client.post("/register", json={**BODY, "email": "not-an-email"})
    expect(response, 422, "9")
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "email"] and problem["msg"], (
        f"9: keep loc and msg, drop input only; got {problem}"
    )


def test_9_answers_with_a_token_are_never_cached(client):
    answers = {"/register": client.post("/register", json=BODY)}
    answers["/login"] = client.post("/login", json=RIGHT)
    token = answers["/login"].json()["token"]
    answers["/password"] = change_password(client, token)
    answers["/refresh"] = refresh(client, answers["/password"].json()["refresh_token"])
    for route, response in answers.items():
        expect(response, 201 if route == "/register" else 200, "9")
        assert response.headers.get("cache-control") == "no-store", (
            f"9: {route} answers a token: say Cache-Control: no-store (RFC 6749, 5.1) "
            "with Depends(no_store)"
        )


def test_9_half_a_utf16_pair_is_422(client, db):
    # JSON may carry "\ud800" (json.dumps writes it so). Pydantic refuses it, but FastAPI's
    # own 422 repeats it, and no UTF-8 answer can hold it: a 500 until the 422 drops "input".
    changes = {
        "surrogate-name": {"full_name": "Ada \ud800"},
        "surrogate-phone": {"phone": "\ud800"},
    }
    expect_422_and_no_user(client, db, changes, "9: drop input from the 422 (validation_error)")
    body = json.dumps({"refresh_token": "\ud800" * 43})
    response = client.post("/refresh", content=body, headers=JSON_HEADERS)
    expect(response, 422, "9: drop input from the 422 (validation_error)")
    changes = {"surrogate-name": {"name": "Linen \ud800"}}
    expect_422_and_no_clothes(client, db, changes, "9: drop input from the 422 (validation_error)")


# --- 10 Input that crashes the app ---------------------------------------------------------

# Passwords that bcrypt refuses with an error, a 500 if they reach it: more than 72 bytes
# (66 characters, 78 bytes: Field(max_length=72) counts characters) and a NUL character.
# Both are hard to guess, so that zxcvbn (7) lets them through to bcrypt.
BCRYPT_REFUSES = {
    "78-byte": "Grüße über Öl und Äpfel, später! " * 2,
    "nul": "correct\x00horse battery",
}


def test_10_a_password_bcrypt_refuses_is_422_at_register(client, db):
    changes = {case: {"password": password} for case, password in BCRYPT_REFUSES.items()}
    expect_422_and_no_user(client, db, changes, "10: check Password with fits_bcrypt")


def test_10_a_password_bcrypt_refuses_is_422_at_login(client):
    register(client)
    for case, password in BCRYPT_REFUSES.items():
        response = client.post("/login", json={"email": "ada@example.com", "password": password})
        expect(response, 422, f"10 ({case}): check Password with fits_bcrypt")


def test_10_a_password_bcrypt_refuses_is_422_as_a_new_password(client, db):
    token = register(client)
    [before] = rows(db, "SELECT * FROM users")
    for case, new_password in BCRYPT_REFUSES.items():
        response = change_password(client, token, new_password)
        expect(response, 422, f"10 ({case}): check NewPassword with fits_bcrypt")
        assert rows(db, "SELECT * FROM users") == [before], f"10 ({case}): nothing changes"


INVALID_TEXT = {
    "nul-name": {"full_name": "Ada\x00Lovelace"},  # PostgreSQL refuses NUL: a 500 there
    "nul-phone": {"phone": "+359\x00888"},
    "newline-name": {"full_name": "Ada\nLovelace"},  # no control characters in a name
    "tab-phone": {"phone": "+359\t888"},
}


def test_10_names_and_phones_are_plain_text(client, db):
    expect_422_and_no_user(client, db, INVALID_TEXT, "10: full_name and phone are PlainText")


INVALID_CLOTHES_TEXT = {
    "nul-name": {"name": "Linen\x00shirt"},  # PostgreSQL refuses NUL: a 500 there
    "newline-name": {"name": "Linen\nshirt"},
}


def test_10_clothes_names_are_plain_text(client, db):
    expect_422_and_no_clothes(client, db, INVALID_CLOTHES_TEXT, "10: ClothesIn's name is PlainText")


def test_10_rows_from_before_the_rules_still_list(client, db):
    # The new rules check what comes in; rows already stored must still be listed.
    token = register(client)
    run_sql(
        db,
        "INSERT INTO clothes (name, color, size, photo_url) "
        "VALUES ('Old\tscarf', 'pink', 'xl', 'https://example.com/scarf.jpg')",
    )
    response = client.get("/clothes/", headers=bearer(token))
    expect(response, 200, "10: put the new rules on ClothesIn, not on ClothesBase")
    assert response.json()[0]["name"] == "Old\tscarf"


SUBS_THAT_ARE_NO_USER_ID = {
    "text": "abc",
    "sql": "1 OR 1=1",
    "leading-zero": "01",
    "40-digits": "9" * 40,  # too large for SQLite's INTEGER: a 500 there
    # Beyond PostgreSQL's INTEGER (2**31 - 1): a 500 there if it reached the query.
    "past-int32": "2147483648",
    "11-digits": "99999999999",
}


def test_10_a_sub_that_is_no_user_id_is_401_invalid_token(probe):
    register(probe)  # user 1 exists, so only the token can be at fault
    for case, sub in SUBS_THAT_ARE_NO_USER_ID.items():
        token = make_token({"sub": sub, "exp": in_one_hour(), "ver": 0})
        response = probe.get("/checkpoint/me", headers=bearer(token))
        expect_401(response, "Invalid token.", f"10 ({case}): check sub with is_user_id")


def test_10_two_authorization_headers_are_refused(probe):
    # Which of two headers counts depends on who reads them: accept neither.
    token = register(probe)
    for headers in (
        [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer junk")],
        [("Authorization", "Bearer junk"), ("Authorization", f"Bearer {token}")],
    ):
        response = probe.get("/checkpoint/me", headers=headers)
        expect_401(
            response, "Send one Authorization header.", "10: refuse two Authorization headers"
        )


# --- 11 Look-alikes --------------------------------------------------------------------------


def test_11_one_account_per_email_whatever_its_letter_case(client, db):
    register(client, email="Ada@Example.com")
    assert [row["email"] for row in rows(db, "SELECT email FROM users")] == ["ada@example.com"], (
        "11: store the email lowercased (AfterValidator(str.lower) in Email)"
    )
    response = client.post("/register", json={**BODY, "email": "ADA@example.com"})
    expect(response, 409, "11: the same email in capitals")
    assert len(rows(db, "SELECT id FROM users")) == 1, "11: one email, one account"


def test_11_login_ignores_the_letter_case_of_the_email(client, db):
    register(client)
    response = client.post("/login", json={"email": "ADA@Example.com", "password": "correct horse"})
    expect(response, 200, "11: log in with the email in capitals (the Email type)")
    payload = jwt.decode(response.json()["token"], SECRET, algorithms=["HS256"])
    assert payload["sub"] == str(user_id(db, "ada@example.com"))


def test_11_an_email_longer_than_its_column_once_lowercased_is_422(client, db):
    # 120 characters, 152 once lowercased: "İ" becomes two.
    email = "İ" * 32 + "@" + "d" * 40 + "." + "e" * 42 + ".com"
    changes = {"email-growing-past-120": {"email": email}}
    expect_422_and_no_user(client, db, changes, "11: check the length after str.lower")


NOT_WEB_ADDRESSES = {
    "javascript-url": {"photo_url": "javascript:alert(1)"},  # shown to every user, maybe as a link
    "data-url": {"photo_url": "data:text/html,<script>alert(1)</script>"},
    "ftp-url": {"photo_url": "ftp://example.com/shirt.jpg"},
    "no-scheme": {"photo_url": "example.com/shirt.jpg"},
    "no-host": {"photo_url": "https://"},
    "nul-url": {"photo_url": "https://example.com/\x00.jpg"},
}


def test_11_photo_url_must_be_a_web_address(client, db):
    expect_422_and_no_clothes(
        client, db, NOT_WEB_ADDRESSES, "11: check photo_url with is_web_address"
    )


def test_11_http_and_https_photos_are_accepted(client, db):
    token = admin_token(client, db)
    for url in ("http://example.com/a.jpg", "HTTPS://EXAMPLE.COM/B.JPG"):
        response = client.post("/clothes/", json={**SHIRT, "photo_url": url}, headers=bearer(token))
        expect(response, 201, "11: an http or https photo URL")
        assert response.json()["photo_url"] == url, "11: store the URL as it was sent"


def test_11_rows_from_before_the_rules_still_list(client, db):
    token = register(client)
    run_sql(
        db,
        "INSERT INTO clothes (name, color, size, photo_url) VALUES ('Scarf', 'pink', 'xl', 'u')",
    )
    response = client.get("/clothes/", headers=bearer(token))
    expect(response, 200, "11: check photo_url on ClothesIn, not on ClothesBase")
    assert response.json()[0]["photo_url"] == "u"


# Text that displays or splits as something else: Unicode's Cc, Cf, Zl and Zp.
LOOK_ALIKE_TEXT = {
    "next-line": {"full_name": "Ada\x85Injected: line"},  # splitlines() splits here
    "right-to-left-override": {"full_name": "\u202egnp.exe"},  # shows as "exe.png"
    "zero-width-space": {"full_name": "Ada\u200bLovelace"},
    "line-separator": {"full_name": "Ada\u2028Lovelace"},
    "paragraph-separator": {"full_name": "Ada\u2029Lovelace"},
    "delete": {"phone": "555\x7f1234"},
}


def test_11_text_that_looks_like_something_else_is_422(client, db):
    expect_422_and_no_user(client, db, LOOK_ALIKE_TEXT, "11: PlainText refuses Cc, Cf, Zl and Zp")
    body = {**BODY, "full_name": "\u202egnp.exe"}
    detail = client.post("/register", json=body).json()["detail"]
    assert [error["loc"] for error in detail] == [["body", "full_name"]], (
        f"11: the 422 names the field, got {detail}"
    )


# A Persian name with a zero-width non-joiner, and a family emoji joined by zero-width joiners.
JOINED_NAMES = ["\u0645\u0647\u200c\u0631\u0646\u0627\u0632", "\U0001f469\u200d\U0001f467"]


def test_11_persian_names_and_emoji_keep_their_zero_width_joiners(client, db):
    for number, name in enumerate(JOINED_NAMES):
        register(client, email=f"user{number}@example.com", full_name=name)
    names = [row["full_name"] for row in rows(db, "SELECT full_name FROM users ORDER BY id")]
    assert names == JOINED_NAMES, f"11: U+200C and U+200D are the formats that stay, got {names}"


def test_11_clothes_names_that_look_like_something_else_are_422(client, db):
    changes = {"right-to-left-override": {"name": "\u202egnp.exe"}, "next-line": {"name": "A\x85B"}}
    expect_422_and_no_clothes(client, db, changes, "11: ClothesIn's name is PlainText")


def test_11_commands_take_an_email_in_any_letter_case(app_dir, db, monkeypatch, capsys):
    with TestClient(load_app(app_dir).app) as client:
        token = register(client)
        run_command(app_dir, monkeypatch, "set-role", "ADA@EXAMPLE.COM", "admin")
        assert rows(db, "SELECT role FROM users")[0]["role"] == "admin", (
            "11: set-role finds the user whatever the letter case (type=email_address)"
        )
        run_command(app_dir, monkeypatch, "logout", "Ada@Example.com")
        expect_401(
            client.get("/clothes/", headers=bearer(token)),
            "Token revoked.",
            "11: logout finds the user whatever the letter case (type=email_address)",
        )


def test_11_commands_normalise_an_email_as_the_api_does(app_dir, db, monkeypatch, capsys):
    with TestClient(load_app(app_dir).app) as client:
        register(client)
    run_command(app_dir, monkeypatch, "set-role", "ada@ＥＸＡＭＰＬＥ.com", "admin")
    assert rows(db, "SELECT role FROM users")[0]["role"] == "admin", (
        "11: set-role reads the email with the API's rules (email_address)"
    )
    with pytest.raises(SystemExit):
        run_command(app_dir, monkeypatch, "set-role", "not an email", "admin")
    assert "not a valid email address" in capsys.readouterr().err, (
        "11: email_address refuses what is not an email (argparse.ArgumentTypeError)"
    )


# --- 12 A flood ------------------------------------------------------------------------------


def test_12_a_full_hashing_line_is_503(app_dir, monkeypatch):
    module = load_app(app_dir)
    patch_app(monkeypatch, module, "MAX_HASHES_IN_LINE", 1)
    patch_app(monkeypatch, module, "BUSY_PAUSE_SECONDS", 0)  # no need to wait in a test
    hashing, release = threading.Event(), threading.Event()
    real_hash = CryptContext.hash

    def slow_hash(self, secret, **kwargs):
        hashing.set()
        release.wait(timeout=10)
        return real_hash(self, secret, **kwargs)

    monkeypatch.setattr(CryptContext, "hash", slow_hash)
    with TestClient(module.app) as client, ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(client.post, "/register", json=BODY)
        assert hashing.wait(timeout=10), "12: the first registration never started its hash"
        busy = client.post("/register", json={**BODY, "email": "bob@example.com"})
        release.set()
        expect(first.result(timeout=10), 201, "12: the first in line is served")
    expect(busy, 503, "12: past MAX_HASHES_IN_LINE, answer 503, not a wait (run_hashing)")
    assert busy.headers.get("retry-after") == "2", "12: say when to come back: Retry-After"


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_12_hashes_run_only_when_a_core_is_idle(app_dir):
    module = load_app(app_dir)
    policy = module.hashing_pool.submit(os.sched_getscheduler, 0).result(timeout=10)
    assert policy == os.SCHED_IDLE, (
        "12: lower_priority puts each hashing thread in SCHED_IDLE: reads wait for no hash"
    )


class HungUp:
    """A request whose client has gone: what run_hashing sees after a hang-up."""

    state = types.SimpleNamespace()

    async def is_disconnected(self):
        return True


def test_12_a_client_that_hung_up_costs_no_hash(app_dir):
    module = load_app(app_dir)
    hashed = []
    with pytest.raises(module.HTTPException) as refused:
        asyncio.run(module.run_hashing(HungUp(), hashed.append, "a password"))
    assert hashed == [], "12: run_hashing checks request.is_disconnected() just before the hash"
    assert refused.value.status_code == 499


def test_12_a_login_turned_away_by_a_busy_server_is_not_counted(app_dir, db, monkeypatch):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        register(client)
        patch_app(monkeypatch, module, "MAX_HASHES_IN_LINE", 10)
        patch_app(monkeypatch, module, "hashes_in_line", 10)  # the line is full
        for _ in range(6):
            expect(client.post("/login", json=RIGHT), 503, "12")
        assert failed_logins(db, "id") == [], (
            "12: refuse what run_hashing would refuse before claim_attempt writes it down"
        )
        monkeypatch.setattr(module, "hashes_in_line", 0)
        expect(client.post("/login", json=RIGHT), 200, "12: six 503s are no six failures")


def test_12_a_login_turned_away_after_its_claim_is_not_counted(app_dir, db, monkeypatch):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        register(client)
        # A burst fills the line between claim_attempt's check and run_hashing's.
        room_then_full = itertools.cycle([False, True])
        patch_app(monkeypatch, module, "no_place_in_line", lambda request: next(room_then_full))
        for _ in range(5):  # five failures in a row would be a 429 next
            expect(client.post("/login", json=RIGHT), 503, "12")
        assert failed_logins(db, "id") == [], (
            "12: a login that run_hashing turns away was never checked: take_back_claim "
            "deletes the claim that claim_attempt wrote (request.state.claim)"
        )
        monkeypatch.setattr(module, "no_place_in_line", lambda request: False)
        expect(client.post("/login", json=RIGHT), 200, "12: five 503s are no five failures")


def test_12_a_request_turned_away_takes_back_only_its_own_claim(app_dir, db, monkeypatch):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        token = register(client)
        real_remember = module.remember_login

        async def remember_while_another_guesses(email, address):
            await real_remember(email, address)
            # Meanwhile someone's wrong guess at Bob is claimed: on SQLite it may get the id
            # of Ada's claim, which forget_failures has just deleted.
            bob = {"email": "bob@example.com", "address": "203.0.113.9", "failed_at": time.time()}
            await module.database.execute(module.failed_logins.insert().values(**bob))

        patch_app(monkeypatch, module, "remember_login", remember_while_another_guesses)
        calls = itertools.count()
        # Room for refuse_easy_password, claim_attempt and the old password's hash; the
        # line is full by the new password's hash.
        patch_app(monkeypatch, module, "no_place_in_line", lambda request: next(calls) >= 3)
        expect(change_password(client, token), 503, "12")
    left = [row["email"] for row in failed_logins(db, "email")]
    assert left == ["bob@example.com"], (
        f"12: failed_logins holds {left}: take_back_claim deleted another's failure. Take "
        "back this request's claim only (its id and failed_at), not whatever row has its id"
    )


def test_12_sign_ups_that_work_count_against_their_address(client, db):
    # 99 failures from this address in the last hour: room for one more sign-up, not two.
    failures(db, [(f"user{number}@example.com", "testclient") for number in range(99)])
    register(client, email="new1@example.com")
    response = client.post("/register", json={**BODY, "email": "new2@example.com"})
    expect_429(response, "12: a sign-up that works still counts against its address")
    assert rows(db, "SELECT email FROM users") == [{"email": "new1@example.com"}], (
        "12: a sign-up refused with 429 stores no user"
    )


def test_12_under_a_flood_a_returning_user_goes_ahead_of_strangers(app_dir, monkeypatch):
    module = load_app(app_dir)
    stranger = {"email": "eve@example.com", "password": "correct horse"}
    with TestClient(module.app) as client:
        register(client)  # Ada is known from this address now (known_logins, 7)
        patch_app(monkeypatch, module, "MAX_HASHES_IN_LINE", 10)
        patch_app(monkeypatch, module, "BUSY_PAUSE_SECONDS", 0.2)
        patch_app(monkeypatch, module, "hashes_in_line", 5)  # half full, as under a flood
        expect(client.post("/login", json=RIGHT), 200, "12: a returning user goes ahead")
        started = time.monotonic()
        refused = client.post("/login", json=stranger)
        expect(refused, 503, "12: under a flood, a stranger gets half the line (no_place_in_line)")
        assert refused.headers.get("retry-after") == "2"
        assert time.monotonic() - started >= 0.2, (
            "12: a stranger's 503 comes after BUSY_PAUSE_SECONDS (turned_away)"
        )
        patch_app(monkeypatch, module, "going_ahead", {(RIGHT["email"], "testclient")})
        expect(
            client.post("/login", json=RIGHT),
            503,
            "12: one login at a time goes ahead for each email and address (going_ahead)",
        )
        monkeypatch.setattr(module, "going_ahead", set())
        monkeypatch.setattr(module, "hashes_in_line", 4)
        expect(client.post("/login", json=stranger), 401, "12: below half, strangers get in")


def test_12_a_returning_user_waits_for_no_strangers_thread(app_dir, monkeypatch):
    module = load_app(app_dir)
    pool = ThreadPoolExecutor(max_workers=2)
    patch_app(monkeypatch, module, "hashing_pool", pool)
    patch_app(monkeypatch, module, "hashing_threads", asyncio.Semaphore(2))
    started, one_more = [], threading.Semaphore(0)
    real_verify = CryptContext.verify

    def held_dummy_verify(self, *args, **kwargs):
        started.append("a stranger's hash")
        one_more.acquire(timeout=10)  # longer than Ada waits below
        return False

    def verify(self, secret, hashed, **kwargs):
        started.append("Ada's login")
        return real_verify(self, secret, hashed, **kwargs)

    with TestClient(module.app) as client, ThreadPoolExecutor(max_workers=4) as requests:
        register(client)  # Ada is known from this address now (known_logins, 7)
        monkeypatch.setattr(CryptContext, "dummy_verify", held_dummy_verify)
        monkeypatch.setattr(CryptContext, "verify", verify)
        strangers = []
        for n in range(3):  # two hold both threads, the third waits for one
            body = {"email": f"bot{n}@example.com", "password": "a guess"}
            strangers.append(requests.submit(client.post, "/login", json=body))
            until(lambda count=n + 1: module.hashes_in_line == count)  # hashing, or waiting
        login = requests.submit(client.post, "/login", json=RIGHT)
        until(lambda: len(started) >= 3, seconds=3)  # while strangers hold both threads
        before_a_thread_is_free = list(started)
        for _ in range(3):
            one_more.release()
        expect(login.result(timeout=10), 200, "12")
        for stranger in strangers:
            expect(stranger.result(timeout=10), 401, "12: the strangers are answered too")
    pool.shutdown()
    assert "Ada's login" in before_a_thread_is_free, (
        f"12: while strangers held both threads, these hashes started: {before_a_thread_is_free}. "
        "Ada, known from this address, hashes in returning_pool: she waits for no stranger "
        "(run_hashing)"
    )


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_12_a_returning_users_hash_comes_before_strangers_on_a_core(app_dir, monkeypatch):
    module = load_app(app_dir)
    priorities = {}
    real_verify = CryptContext.verify

    def this_threads_priority():
        return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    def verify(self, secret, hashed, **kwargs):
        priorities["Ada's"] = this_threads_priority()
        return real_verify(self, secret, hashed, **kwargs)

    def dummy_verify(self, *args, **kwargs):
        priorities["a stranger's"] = this_threads_priority()
        return False

    with TestClient(module.app) as client:
        register(client)  # Ada is known from this address now (known_logins, 7)
        monkeypatch.setattr(CryptContext, "verify", verify)
        monkeypatch.setattr(CryptContext, "dummy_verify", dummy_verify)
        expect(client.post("/login", json=RIGHT), 200, "12")
        stranger = {"email": "eve@example.com", "password": "a guess"}
        expect(client.post("/login", json=stranger), 401, "12")
    assert priorities == {"Ada's": (os.SCHED_OTHER, 19), "a stranger's": (os.SCHED_IDLE, 19)}, (
        f"12: the hashes ran with (policy, nice) {priorities}: a returning user's hash runs in "
        "returning_pool at nice 19 (lower_priority), strangers' in SCHED_IDLE (lowest_priority), "
        "so hers comes first on a core that strangers' hashes keep busy"
    )


def test_12_strangers_leave_threads_free_for_returning_users(app_dir, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # CORES: two hashing threads
    module = load_app(app_dir)
    held, done = [], threading.Event()

    def held_dummy_verify(self, *args, **kwargs):
        held.append("a stranger's hash")
        done.wait(timeout=10)
        return False

    with TestClient(module.app) as client, ThreadPoolExecutor(max_workers=2) as requests:
        register(client)  # Ada is known from this address now (known_logins, 7)
        monkeypatch.setattr(CryptContext, "dummy_verify", held_dummy_verify)
        strangers = []
        for n in range(2):
            body = {"email": f"bot{n}@example.com", "password": "a guess"}
            strangers.append(requests.submit(client.post, "/login", json=body))
        until(lambda: module.hashes_in_line == 2)  # hashing, or waiting for a thread
        time.sleep(0.1)
        expect(client.post("/login", json=RIGHT), 200, "12")
        hashing = len(held)
        done.set()
        for stranger in strangers:
            expect(stranger.result(timeout=10), 401, "12: the strangers are answered too")
    assert hashing == 1, (
        f"12: {hashing} strangers hashed at once on 2 cores, so Ada waited for one of them: "
        "strangers get half the threads (hashing_threads), the rest are kept for returning users"
    )


@pytest.fixture
def connections(monkeypatch):
    """Count the connections the app takes from the database driver and gives back:
    aiosqlite opens a new one each time, asyncpg lends one from its pool."""
    count = {"taken": 0, "given back": 0}

    def counting(function, key):
        def counted(*args, **kwargs):
            count[key] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(aiosqlite, "connect", counting(aiosqlite.connect, "taken"))
    close = counting(aiosqlite.Connection.close, "given back")
    monkeypatch.setattr(aiosqlite.Connection, "close", close)
    monkeypatch.setattr(asyncpg.Pool, "acquire", counting(asyncpg.Pool.acquire, "taken"))
    monkeypatch.setattr(asyncpg.Pool, "release", counting(asyncpg.Pool.release, "given back"))
    return count


def with_test_routes(module):
    """The app, with two routes of the tests' own behind oauth2_scheme."""

    @module.app.get("/checkpoint/query", dependencies=[Depends(module.oauth2_scheme)])
    async def one_more_query():
        return await module.database.fetch_val("SELECT 1")

    @module.app.get("/checkpoint/crash", dependencies=[Depends(module.oauth2_scheme)])
    async def crash():
        raise RuntimeError("a bug in a route: a 500")

    return module.app


def test_12_the_token_check_and_the_route_share_one_connection(app_dir, connections):
    with TestClient(with_test_routes(load_app(app_dir))) as client:
        token = register(client)
        for headers, status_code in [(bearer(token), 200), (bearer("not-a-jwt"), 401)]:
            taken = connections["taken"]
            expect(client.get("/checkpoint/query", headers=headers), status_code, "12")
            assert connections["taken"] - taken <= 1, (
                f"12: a request answered {status_code} took {connections['taken'] - taken} "
                "database connections, one per query: the user lookup and the route share "
                "one (Depends(one_connection) in CustomHTTPBearer)"
            )
            assert connections["given back"] == connections["taken"], (
                f"12: a request answered {status_code} and kept its database connection"
            )


def hung_up(app, path, token):
    """GET path straight from the ASGI app, for a client that hangs up at once:
    uvicorn tells the app so (http.disconnect) and drops the answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
    }

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    return app(scope, receive, send)


def test_12_requests_cut_short_give_their_connections_back(app_dir, connections):
    app = with_test_routes(load_app(app_dir))
    with TestClient(app) as client:
        token = register(client)

    async def burst():
        async with app.router.lifespan_context(app):
            requests = []
            for _ in range(10):  # 30 at once: more than asyncpg's pool of 10 connections
                requests.append(hung_up(app, "/checkpoint/query", token))
                requests.append(hung_up(app, "/checkpoint/query", "not-a-jwt"))
                requests.append(hung_up(app, "/checkpoint/crash", token))
            await asyncio.gather(*requests, return_exceptions=True)

    try:
        asyncio.run(asyncio.wait_for(burst(), 30))
    except TimeoutError:
        pytest.fail("12: requests waited 30 s for a database connection", pytrace=False)
    assert connections["given back"] == connections["taken"], (
        f"12: {connections['taken'] - connections['given back']} database connections "
        "still taken after a burst of requests cut short"
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_12_a_body_over_64_kib_is_413(client, db, chunked):
    body = b'{"email": "ada@example.com", "password": "' + b"x" * 70_000 + b'"}'
    content = iter([body[:1000], body[1000:]]) if chunked else body
    response = client.post("/register", content=content, headers=JSON_HEADERS)
    expect(response, 413, "12: LimitBodySize refuses a body over MAX_BODY_BYTES")
    assert response.json() == {"detail": "Request body too large."}
    assert rows(db, "SELECT id FROM users") == []


def refresh_chain(client, token, times):
    """Refresh `times` times in a row; the last answer and the refresh token to use next."""
    for _ in range(times):
        answer = refresh(client, token)
        if answer.status_code != 200:
            return answer, token
        token = answer.json()["refresh_token"]
    return answer, token


class HeldForThreeSeconds:
    """A refresh's turn that another refresh holds for 3 seconds, as a lock would."""

    async def acquire(self):
        await asyncio.sleep(3)
        return True

    def release(self):
        pass

    async def __aenter__(self):
        return await self.acquire()

    async def __aexit__(self, *error):
        pass


def spent_long_ago(db):
    table = reflected(db, "refresh_tokens")
    with db.begin() as connection:
        past = datetime.now(timezone.utc) - timedelta(minutes=11)
        connection.execute(
            table.update().where(table.c.spent_at.is_not(None)).values(spent_at=past)
        )


def test_12_a_login_refreshes_at_most_10_times_in_10_minutes(client, db):
    register(client)
    answer, token = refresh_chain(client, log_in_for_a_pair(client)["refresh_token"], 11)
    expect(answer, 429, "12: the 11th refresh in 10 minutes is refused (check_refresh_rate)")
    seconds = answer.headers.get("retry-after", "")
    assert seconds.isdigit() and 590 <= int(seconds) <= 600, (
        f"12: Retry-After says when the oldest of the 10 is 10 minutes old, got {seconds!r}"
    )
    assert answer.json() == {"detail": f"Too many refreshes: try again in {seconds} s."}
    spent_long_ago(db)
    expect(refresh(client, token), 200, "12: the refused token stays unspent, for later")


def test_12_a_login_keeps_only_its_last_spent_tokens(client, db):
    register(client)
    token = log_in_for_a_pair(client)["refresh_token"]
    for _ in range(3):
        answer, token = refresh_chain(client, token, 10)
        expect(answer, 200, "12")
        spent_long_ago(db)
    spent = [row for row in refresh_rows(db) if row["spent_at"] is not None]
    assert len(spent) == 11, (
        f"12: 30 refreshes keep the last 11 spent tokens, not {len(spent)} (forget_spent_tokens)"
    )
    expect(refresh(client, token), 200, "12: the latest token still works")


def test_12_a_forgotten_spent_token_that_comes_back_still_ends_its_family(client, db, caplog):
    register(client)
    first = log_in_for_a_pair(client)["refresh_token"]
    answer, token = refresh_chain(client, first, 10)
    spent_long_ago(db)
    answer, token = refresh_chain(client, token, 5)
    expect(answer, 200, "12")
    first_hash = hashlib.sha256(first.encode()).hexdigest()
    assert not rows(db, "SELECT id FROM refresh_tokens WHERE token_hash = :h", h=first_hash), (
        "12: forget_spent_tokens removed the first token's row"
    )
    expect_401(
        refresh(client, first),
        "Refresh token already used: log in again.",
        "12: the token names its family (store_refresh_token), which refuse_a_forgotten_token ends",
    )
    expect_401(refresh(client, token), "Refresh token revoked.", "12: the whole family is ended")


def test_12_a_user_keeps_only_the_sessions_used_last(app_dir, db, monkeypatch):
    module = load_app(app_dir)
    patch_app(monkeypatch, module, "MAX_SESSIONS", 3)
    with TestClient(module.app) as client:
        register(client)  # the first session: the oldest when the fourth starts
        bob = {"email": "bob@example.com", "password": "tulip quartz lamp", "full_name": "Bob"}
        signed_up = client.post("/register", json=bob)
        expect(signed_up, 201, "12")
        bobs = signed_up.json()["refresh_token"]
        phone, laptop, tablet = (log_in_for_a_pair(client)["refresh_token"] for _ in range(3))
        answer = refresh(client, phone)
        expect(answer, 200, "12")  # now the phone's family is Ada's one used last
        bobs_answer = refresh(client, bobs)
        # Bob's family is used after all of Ada's.
        expect(bobs_answer, 200, "12: a login ends only its own user's sessions")
        watch = log_in_for_a_pair(client)["refresh_token"]
        expect_401(
            refresh(client, laptop),
            "Invalid refresh token.",
            "12: a new login ends the user's session used longest ago (forget_oldest_sessions)",
        )
        for token in (answer.json()["refresh_token"], tablet, watch):
            expect(refresh(client, token), 200, "12: the user's sessions used last go on")
        expect(
            refresh(client, bobs_answer.json()["refresh_token"]),
            200,
            "12: a login ends only its own user's sessions",
        )
    families = rows(db, "SELECT DISTINCT user_id, family FROM refresh_tokens")
    assert len(families) == 4, (
        f"12: Ada keeps MAX_SESSIONS families and Bob his one, not {families}"
    )


def test_12_refreshes_take_turns_in_the_order_they_came(app_dir, db, monkeypatch):
    module = load_app(app_dir)
    store_refresh_token = module.store_refresh_token
    refuse_before_its_turn = module.refuse_before_its_turn
    holding, came = threading.Event(), []

    async def arriving(token, token_hash, now):
        await refuse_before_its_turn(token, token_hash, now)
        came.append(token)  # and with no await between, refresh waits for its turn

    async def the_first_holds_the_database(**values):
        if not holding.is_set():
            holding.set()
            await asyncio.sleep(0.6)  # inside its transaction: SQLite's write lock is its
        return await store_refresh_token(**values)

    with TestClient(module.app) as client, ThreadPoolExecutor(max_workers=7) as pool:
        register(client)
        tokens = [log_in_for_a_pair(client)["refresh_token"] for _ in range(7)]
        patch_app(monkeypatch, module, "store_refresh_token", the_first_holds_the_database)
        patch_app(monkeypatch, module, "refuse_before_its_turn", arriving)
        answers = [pool.submit(refresh, client, tokens[0])]
        assert holding.wait(5), "12: the refresh did not store its next token"
        for token in tokens[1:]:
            time.sleep(0.03)  # six more, one after another, while the first holds it
            answers.append(pool.submit(refresh, client, token))
        for answer in answers:
            expect(answer.result(), 200, "12")
    assert len(came) == len(tokens), (
        "12: refresh calls refuse_before_its_turn right after token_hash = …, before its turn"
    )
    # Each refresh stored its family's next token: their ids say in which order they ran.
    families = [token.partition(".")[0] for token in tokens]
    arrived = [token.partition(".")[0] for token in came]
    stored = rows(db, "SELECT family FROM refresh_tokens WHERE spent_at IS NULL ORDER BY id")
    ran = [row["family"] for row in stored if row["family"] in families]
    assert ran == arrived, (
        "12: refreshes take turns in the order they came (refreshes_one_at_a_time); "
        f"they came {[families.index(f) for f in arrived]}, ran {[families.index(f) for f in ran]}"
    )


def test_12_a_token_that_cannot_be_spent_is_refused_before_its_turn(app_dir, monkeypatch):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        register(client)
        first = log_in_for_a_pair(client)["refresh_token"]
        answer, latest = refresh_chain(client, first, 10)
        expect(answer, 200, "12")
        patch_app(monkeypatch, module, "refreshes_one_at_a_time", HeldForThreeSeconds())
        # One too many, made up, and spent: none of them may wait for a turn to be refused.
        refusals = [
            (latest, 429, "Too many refreshes"),
            ("made-up.token", 401, "Invalid refresh token."),
            (first, 401, "Refresh token already used: log in again."),
        ]
        for token, status_code, detail in refusals:
            started = time.monotonic()
            answer = refresh(client, token)
            expect(answer, status_code, "12: refresh calls refuse_before_its_turn")
            assert answer.json()["detail"].startswith(detail), f"12: {answer.json()}"
            assert time.monotonic() - started < 1.5, (
                "12: a refresh that would be refused is refused by reads, before its turn "
                "(refuse_before_its_turn): a flood of them must make no one wait"
            )


if "postgresql" in DATABASES:  # PostgreSQL only: SQLite locks the whole file, not rows.

    @pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
    def test_12_a_login_does_not_wait_for_a_session_being_refreshed(app_dir, db, monkeypatch):
        module = load_app(app_dir)
        patch_app(monkeypatch, module, "MAX_SESSIONS", 1)
        with TestClient(module.app) as client:
            register(client)  # the session a refresh holds below
            with db.begin() as refreshing:
                # What a refresh in flight holds until it commits: the row it spends.
                run = refreshing.execute(
                    sqlalchemy.text("UPDATE refresh_tokens SET spent_at = now()")
                )
                assert run.rowcount == 1
                started = time.monotonic()
                expect(
                    client.post("/login", json=RIGHT),
                    200,
                    "12: forget_oldest_sessions skips the rows a refresh holds (skip_locked)",
                )
                assert time.monotonic() - started < 2, "12: the login waited for the refresh"

    @pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
    def test_12_a_refresh_does_not_wait_for_a_reuse_ending_its_family(client, db):
        register(client)
        answer, token = refresh_chain(client, log_in_for_a_pair(client)["refresh_token"], 10)
        spent_long_ago(db)
        answer, token = refresh_chain(client, token, 1)
        expect(answer, 200, "12")  # 11 spent tokens: the next refresh forgets the oldest
        with db.begin() as ending:
            # What a reuse ending the family holds until it commits: the rows it marks.
            oldest = "SELECT id FROM refresh_tokens WHERE spent_at IS NOT NULL ORDER BY id LIMIT 1"
            ending.execute(sqlalchemy.text(oldest + " FOR UPDATE"))
            started = time.monotonic()
            expect(
                refresh(client, token),
                200,
                "12: forget_spent_tokens skips the rows another request holds (skip_locked)",
            )
            assert time.monotonic() - started < 2, "12: the refresh waited for the reuse"


# --- 13 A new server, an old database --------------------------------------------------------


def refused_start(app_dir, capsys, why, section="13"):
    """What the app printed when it refused to start; a failure if nothing stopped it."""
    capsys.readouterr()
    try:
        load_app(app_dir)
    except SystemExit as stopped:
        assert stopped.code == 3, (
            f"{section}: refuse with refuse_to_start (exit status 3, uvicorn's STARTUP_FAILURE, "
            f"so that --workers stops too), not with exit status {stopped.code!r}"
        )
        return capsys.readouterr().err
    pytest.fail(f"{section}: {why} must stop the app", pytrace=False)


def test_13_a_short_secret_stops_startup_with_exit_status_3_and_advice(
    app_dir, monkeypatch, capsys
):
    monkeypatch.setenv("JWT_SECRET", "s" * 31)
    printed = refused_start(app_dir, capsys, "a JWT_SECRET shorter than 32 bytes")
    assert "JWT_SECRET" in printed, f"13: say what is wrong; printed {printed!r}"
    assert "secrets.token_urlsafe" in printed, "13: say how to make a good secret"
    assert "Traceback" not in printed, "13: one clear message, no traceback"


def test_13_missing_secret_still_starts_with_a_warning(app_dir, db, monkeypatch, caplog):
    monkeypatch.delenv("JWT_SECRET")
    module = load_app(app_dir)
    assert "JWT_SECRET is not set" in caplog.text, "13: warn that JWT_SECRET is not set"
    assert token_for_ada(module, db)


def test_13_missing_secret_is_made_once_and_kept(app_dir, db, monkeypatch):
    # Another worker of `uvicorn --workers 4`, or a restart, must read the same secret.
    monkeypatch.delenv("JWT_SECRET")
    token = token_for_ada(load_app(app_dir), db)
    kept = app_dir / ".jwt_secret"
    assert kept.exists(), "13: keep the secret made up in .jwt_secret beside main.py"
    assert kept.stat().st_mode & 0o777 == 0o600, "13: only you may read .jwt_secret (0600)"
    restarted = load_app(app_dir)
    assert jwt.decode(token, restarted.JWT_SECRET, algorithms=["HS256"])["sub"] == "42", (
        "13: after a restart the app must read the same secret, so old tokens still work"
    )


def test_13_missing_secret_says_once_where_it_is_kept(app_dir, monkeypatch, caplog):
    monkeypatch.delenv("JWT_SECRET")
    load_app(app_dir)
    assert str(app_dir / ".jwt_secret") in caplog.text, "13: say where the secret is kept"
    caplog.clear()
    load_app(app_dir)
    assert "JWT_SECRET" not in caplog.text, "13: say it once, when the file is made"


def secrets_read_at_once(module, kept, workers=8):
    """What each of several workers, started at the same moment, reads as the secret."""
    start = threading.Barrier(workers)

    def start_worker(_):
        start.wait()
        return module.load_or_create_secret(kept)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return set(pool.map(start_worker, range(workers)))


def test_13_workers_starting_at_once_agree_on_the_secret(app_dir, tmp_path):
    module = load_app(app_dir)
    for attempt in range(5):  # a race shows only now and then: try a few times
        folder = tmp_path / f"empty-{attempt}"
        folder.mkdir()
        kept = folder / ".jwt_secret"
        found = secrets_read_at_once(module, kept)
        assert found == {kept.read_text()}, f"13: 8 workers read {len(found)} secrets"
        assert len(kept.read_text()) >= 32, "13: make it with secrets.token_urlsafe(32)"
        assert [path.name for path in folder.iterdir()] == [".jwt_secret"], "13: no file left"


def test_13_missing_secret_is_random_per_folder(app_dir, tmp_path, monkeypatch):
    # A made-up secret that anybody could read in main.py would be no secret.
    monkeypatch.delenv("JWT_SECRET")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(app_dir / "main.py", other / "main.py")
    assert load_app(app_dir).JWT_SECRET != load_app(other).JWT_SECRET, (
        "13: make a random secret (secrets.token_urlsafe), one per app folder"
    )


def test_13_a_set_secret_wins_and_no_file_is_made(app_dir):
    assert load_app(app_dir).JWT_SECRET == SECRET
    assert not (app_dir / ".jwt_secret").exists(), "13: JWT_SECRET is set: keep no file"


def test_13_a_kept_secret_that_is_not_text_stops_startup_clearly(app_dir, monkeypatch, capsys):
    monkeypatch.delenv("JWT_SECRET")
    (app_dir / ".jwt_secret").write_bytes(b"\xff\xfe not text")
    printed = refused_start(app_dir, capsys, "a .jwt_secret that is not text")
    assert ".jwt_secret" in printed and "Delete" in printed and "JWT_SECRET" in printed, (
        f"13: name the file and say how to fix it; printed {printed!r}"
    )


def startup_refusal(module, capsys):
    """What the app prints when it refuses to start, as uvicorn starts it; None if it starts.

    It speaks the ASGI lifespan protocol, as uvicorn does: the app must answer
    "lifespan.startup.failed" and stop with exit status 3, uvicorn's STARTUP_FAILURE.
    """
    to_app = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    from_app = []

    async def receive():
        return next(to_app)

    async def send(message):
        from_app.append(message["type"])

    capsys.readouterr()
    try:
        asyncio.run(module.app({"type": "lifespan", "state": {}}, receive, send))
    except SystemExit as stopped:
        assert (stopped.code, from_app) == (3, ["lifespan.startup.failed"]), (
            "13: refuse in StartupChecks with refuse_to_start: uvicorn must hear "
            f"lifespan.startup.failed and see exit status 3; got {stopped.code!r}, {from_app}"
        )
        return capsys.readouterr().err
    return None


def test_13_a_database_that_cannot_be_opened_stops_startup_clearly(app_dir, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{app_dir / 'no such folder' / 'x.db'}")
    try:
        refusal = startup_refusal(load_app(app_dir), capsys)
    except sqlalchemy.exc.OperationalError as error:
        pytest.fail(
            f"13: stop with a clear message (create_tables), not with {error}", pytrace=False
        )
    assert refusal and "Cannot open the database" in refusal and "DATABASE_URL" in refusal, (
        f"13: say the database cannot be opened, and what to check; got {refusal!r}"
    )
    assert "Traceback" not in refusal, "13: one clear message, no traceback"


# The users table as part 3 left it, in SQL that SQLite and PostgreSQL both take.
PART_3_USERS = (
    "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(120) NOT NULL UNIQUE, "
    "password VARCHAR(255) NOT NULL, full_name VARCHAR(200), phone VARCHAR(13), "
    "created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, "
    "last_modified_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP{more})"
)


@pytest.mark.parametrize(
    "more, missing",
    [("", "role"), (", role VARCHAR(11) NOT NULL DEFAULT 'user'", "token_version")],
    ids=["part-3", "before-6"],
)
def test_13_an_old_database_is_refused_at_startup(app_dir, db, capsys, more, missing):
    # create_all leaves an existing table as it is: the new column would be missing.
    run_sql(db, PART_3_USERS.format(more=more))
    refusal = startup_refusal(load_app(app_dir), capsys)
    assert refusal and missing in refusal and "migration" in refusal, (
        f"13: on a users table without {missing}, stop at startup with a message that names "
        f"the column and the fix, a migration (check_columns), not with a 500 later; "
        f"got {refusal!r}"
    )
    assert "Traceback" not in refusal, "13: one clear message, no traceback"


def test_13_commands_refuse_an_old_database_too(app_dir, db, monkeypatch, capsys):
    run_sql(db, PART_3_USERS.format(more=""))
    try:
        run_command(app_dir, monkeypatch, "set-role", "ada@example.com", "admin")
    except SystemExit as stopped:
        printed = capsys.readouterr().err
        assert stopped.code == 3 and "role" in printed, f"13: got {stopped.code!r}, {printed!r}"
    except sqlalchemy.exc.DBAPIError as error:
        pytest.fail(
            f"13: main() checks the columns too (check_columns) before any command, "
            f"not {error.orig}",
            pytrace=False,
        )
    else:
        pytest.fail("13: main() must refuse a database without the role column", pytrace=False)


def test_13_sqlite_runs_in_wal_mode(client, db):
    if db.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    [mode] = rows(db, "PRAGMA journal_mode")
    assert mode["journal_mode"] == "wal", "13: readers must not wait for writers (use_wal_mode)"


def test_13_workers_starting_at_once_create_the_tables_once(app_dir, db):
    # uvicorn --workers 4 starts four apps at once, and each creates the tables: create_all
    # alone looks, then creates, so two workers can both find no table and both create it.
    module = load_app(app_dir)
    start = threading.Barrier(8)

    def start_worker(_):
        start.wait()
        module.create_tables()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(start_worker, range(8)))  # list(): re-raises a worker's error
    tables = set(sqlalchemy.inspect(db).get_table_names())
    assert {"users", "clothes"} <= tables, f"13: create_tables made {sorted(tables)}"


def test_13_only_a_taken_email_is_409(app_dir, db):
    # Another broken rule is a server error to fix, not "email taken".
    if db.dialect.name != "sqlite":
        pytest.skip("uses a SQLite trigger")
    with TestClient(load_app(app_dir).app, raise_server_exceptions=False) as client:
        run_sql(
            db,
            "CREATE TRIGGER refuse BEFORE INSERT ON users "
            "BEGIN SELECT RAISE(ABORT, 'the disk is full'); END",
        )
        response = client.post("/register", json=BODY)
    assert response.status_code == 500, (
        "13: answer 409 only for a taken email (is_email_taken: SQLITE_CONSTRAINT_UNIQUE), "
        f"got {response.status_code}: {response.text}"
    )


def test_13_create_user_makes_an_admin_who_can_add_clothes(app_dir, db, monkeypatch, capsys):
    run_command(app_dir, monkeypatch, "create-user", "boss@example.com", "--role", "admin")
    assert "Created boss@example.com" in capsys.readouterr().out, "13: say what was created"
    [user] = rows(db, "SELECT role FROM users WHERE email = 'boss@example.com'")
    assert user["role"] == "admin"
    with TestClient(load_app(app_dir).app) as client:
        response = client.post(
            "/login", json={"email": "boss@example.com", "password": "admin password"}
        )
        expect(response, 200, "13: the new admin logs in")
        created = client.post("/clothes/", json=SHIRT, headers=bearer(response.json()["token"]))
        expect(created, 201, "13: the new admin adds clothes")


def test_13_create_user_makes_an_admin_by_default(app_dir, db, monkeypatch):
    run_command(app_dir, monkeypatch, "create-user", "boss@example.com")
    [user] = rows(db, "SELECT role FROM users")
    assert user["role"] == "admin", "13: create-user without --role makes an admin"


def test_13_create_user_twice_fails_and_keeps_the_first(app_dir, db, monkeypatch):
    run_command(app_dir, monkeypatch, "create-user", "boss@example.com", "--role", "admin")
    with pytest.raises(SystemExit, match="boss@example.com is taken"):
        run_command(app_dir, monkeypatch, "create-user", "BOSS@example.com", "--role", "user")
    [user] = rows(db, "SELECT email, role FROM users")
    assert (user["email"], user["role"]) == ("boss@example.com", "admin"), (
        "13: the first user stays, its email lowercased as at /register"
    )


def test_13_create_user_reports_other_database_errors_as_they_are(app_dir, db, monkeypatch):
    # As at /register: only a taken email is "taken"; any other broken rule shows itself.
    if db.dialect.name != "sqlite":
        pytest.skip("uses a SQLite trigger")
    run_command(app_dir, monkeypatch, "create-user", "first@example.com")
    run_sql(
        db,
        "CREATE TRIGGER refuse BEFORE INSERT ON users "
        "BEGIN SELECT RAISE(ABORT, 'the disk is full'); END",
    )
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="the disk is full"):
        run_command(app_dir, monkeypatch, "create-user", "boss@example.com")


@pytest.mark.parametrize(
    "password, args, rule",
    [
        ("shrt", [], "password"),
        ("iloveyou", [], "too common"),
        ("admin password", ["--full-name", "B\x00b"], "full_name"),
    ],
    ids=["short", "common", "control-character"],
)
def test_13_create_user_checks_what_it_is_given(app_dir, db, monkeypatch, password, args, rule):
    with pytest.raises(SystemExit) as stopped:
        run_command(app_dir, monkeypatch, "create-user", "b@example.com", *args, password=password)
    said = str(stopped.value.code)
    assert rule in said, f"13: create-user refuses it and says why ({rule}); it said {said!r}"
    assert password not in said, "13: never show the password on screen"
    assert rows(db, "SELECT id FROM users") == [], "13: create nobody"


# --- 14 Every answer in /docs ------------------------------------------------------------------


def test_14_swagger_groups_operations_by_lesson_section(client):
    # Students spend section 2.2 in Swagger: it should read like the lesson.
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] and schema["info"]["description"]
    operations = {
        f"{method.upper()} {path}": (operation.get("tags"), operation.get("summary"))
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    }
    assert operations == {
        "POST /register": (["1 · JWT"], "1.3 Register a user and get a token"),
        "GET /clothes/": (["2 · Authentication"], "2.2 List clothes (any logged-in user)"),
        "POST /clothes/": (["3 · Authorization"], "3.2 Add clothes (admin and super_admin only)"),
        "POST /login": (["4 · Logging in"], "4 Log in with email and password and get a token"),
        "POST /logout": (
            ["6 · Going further"],
            "6 Log out: every token of this user stops working",
        ),
        "POST /password": (
            ["6 · Going further"],
            "6 Change the password: older tokens stop working, here is a new one",
        ),
        "POST /refresh": (
            ["8 · Going further"],
            "8 Trade a refresh token for a new pair of tokens",
        ),
    }, "14: give every route the tags and summary of its lesson section"


# Every error each route can answer, besides FastAPI's own 422.
ERRORS = {
    "POST /register": {"400", "409", "413", "429", "503"},
    "GET /clothes/": {"401"},
    "POST /clothes/": {"400", "401", "403", "413"},
    "POST /login": {"400", "401", "413", "429", "503"},
    "POST /logout": {"401"},
    "POST /password": {"400", "401", "413", "429", "503"},
    "POST /refresh": {"400", "401", "413", "429"},
}


def test_14_openapi_declares_every_error_answer(client):
    schema = client.get("/openapi.json").json()
    for operation, codes in ERRORS.items():
        method, path = operation.split()
        responses = schema["paths"][path][method.lower()]["responses"]
        assert codes <= set(responses), (
            f"14: {operation} should declare {sorted(codes - set(responses))} in responses="
        )
        for code in codes:
            content = responses[code].get("content", {}).get("application/json", {})
            assert content.get("schema") == {"$ref": "#/components/schemas/ErrorOut"}, (
                f"14: {operation}'s {code} answers an ErrorOut"
            )
    error_out = schema["components"]["schemas"]["ErrorOut"]
    assert set(error_out["properties"]) == {"detail"}, "14: ErrorOut holds the detail"


# --- 15 The database stops answering ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("JWT_EXPIRES_MINUTES", "abc"),
        ("JWT_EXPIRES_MINUTES", "0"),
        ("BCRYPT_ROUNDS", "3"),
        ("BCRYPT_ROUNDS", "32"),
        ("REFRESH_EXPIRES_DAYS", "-1"),
        ("SESSION_EXPIRES_DAYS", "x"),
    ],
)
def test_15_a_wrong_setting_stops_startup_clearly(app_dir, monkeypatch, capsys, name, value):
    monkeypatch.setenv(name, value)
    printed = refused_start(app_dir, capsys, f"{name}={value}", section="15")
    assert name in printed, f"15: name the setting that is wrong; printed {printed!r}"
    assert "Traceback" not in printed, "15: one clear message, no traceback (number_setting)"


def test_15_a_wrong_database_url_is_refused_without_its_password(app_dir, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgres://shop:s3cret-pw@localhost/shop")
    printed = refused_start(app_dir, capsys, "DATABASE_URL=postgres://…", section="15")
    assert "DATABASE_URL" in printed and "postgresql://" in printed, (
        f"15: say what DATABASE_URL accepts (checked_database_url); printed {printed!r}"
    )
    assert "s3cret-pw" not in printed, "15: never print a database URL: it holds a password"


def database_away(database_url, tmp_path):
    """The error a driver raises when its database cannot answer: SQLite locked, or no server."""
    if not database_url.startswith("sqlite"):
        return ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        waiter.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as locked:
        return locked
    finally:
        holder.close()
        waiter.close()
    raise AssertionError("SQLite let two writers in at once")


def log_lines(caplog, words):
    return [record.getMessage() for record in caplog.records if words in record.getMessage()]


def test_15_a_database_that_does_not_answer_is_503_and_one_log_line(
    app_dir, database_url, tmp_path, monkeypatch, caplog
):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        token = register(client)
        answering = module.database.fetch_all

        async def not_answering(*args, **kwargs):
            raise database_away(database_url, tmp_path)

        monkeypatch.setattr(module.database, "fetch_all", not_answering)
        with caplog.at_level(logging.WARNING):
            answers = [client.get("/clothes/", headers=bearer(token)) for _ in range(3)]
            for answer in answers:
                expect(answer, 503, "15: a database that cannot answer is a 503 (DatabaseAway)")
                assert answer.headers.get("retry-after") == "5", "15: say when: Retry-After"
                assert answer.json() == {
                    "detail": "The database is not answering: try again in a few seconds."
                }, f"15: say what is wrong, got {answer.json()}"
            away = log_lines(caplog, "not answering")
            assert len(away) == 1 and away[0].startswith("GET /clothes/: "), (
                f"15: one log line, naming the route, for three failures; logged {away}"
            )
            monkeypatch.setattr(module.database, "fetch_all", answering)
            expect(client.get("/clothes/", headers=bearer(token)), 200, "15: back by itself")
            back = log_lines(caplog, "answers again")
            assert back == ["GET /clothes/: the database answers again."], (
                f"15: one log line when the route answers again; logged {back}"
            )


@pytest.mark.parametrize(
    "error",
    [
        # PostgreSQL ended a connection just as a query started on it.
        asyncpg.InternalClientError("cannot switch to state 11; another operation (2)"),
        # PostgreSQL cancelled one of two requests that waited for each other's rows.
        asyncpg.DeadlockDetectedError("deadlock detected"),
    ],
    ids=["connection-ended", "deadlock"],
)
def test_15_a_connection_ended_or_a_deadlock_is_503(app_dir, monkeypatch, error):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        token = register(client)

        async def failing(*args, **kwargs):
            raise error

        monkeypatch.setattr(module.database, "fetch_all", failing)
        answer = client.get("/clothes/", headers=bearer(token))
        expect(answer, 503, f"15: asyncpg's {type(error).__name__} is a database away")
        assert answer.headers.get("retry-after"), "15: a 503 says when to try again"


def test_15_a_bug_is_still_a_500_with_its_traceback(app_dir, monkeypatch):
    module = load_app(app_dir)
    with TestClient(module.app) as client:
        token = register(client)

        async def bug(*args, **kwargs):
            sqlite3.connect(":memory:").execute("SELECT no_such_column")

        monkeypatch.setattr(module.database, "fetch_all", bug)
        # TestClient raises what the server would log with its traceback.
        with pytest.raises(sqlite3.OperationalError, match="no such column"):
            client.get("/clothes/", headers=bearer(token))


@pytest.mark.parametrize("failing", ["start_session", "remember_login"])
def test_15_a_registration_that_fails_halfway_stores_no_user(
    app_dir, db, database_url, tmp_path, monkeypatch, failing
):
    module = load_app(app_dir)

    async def not_answering(*args):
        raise database_away(database_url, tmp_path)

    patch_app(monkeypatch, module, failing, not_answering)
    with TestClient(module.app, raise_server_exceptions=False) as client:
        expect(client.post("/register", json=BODY), 503, "15: the database failed: 503")
    assert rows(db, "SELECT id FROM users") == [], (
        f"15: {failing} failed, and the user was stored: a sign-up's writes are one transaction"
    )


def test_15_a_right_password_is_not_left_counted_as_a_failure(
    app_dir, db, database_url, tmp_path, monkeypatch
):
    module = load_app(app_dir)
    with TestClient(module.app, raise_server_exceptions=False) as client:
        register(client)
        answering = module.database.execute
        failed = []

        async def away_while_forgetting(query, *args, **kwargs):
            forgetting = "DELETE FROM failed_logins WHERE failed_logins.email"
            if str(query).startswith(forgetting) and not failed:
                failed.append(query)
                raise database_away(database_url, tmp_path)
            return await answering(query, *args, **kwargs)

        monkeypatch.setattr(module.database, "execute", away_while_forgetting)
        right = client.post("/login", json={"email": BODY["email"], "password": BODY["password"]})
        expect(right, 503, "15: the database failed while forgetting the failures: 503")
        wrong = client.post("/login", json={"email": BODY["email"], "password": "wrong horse"})
        expect(wrong, 401, "4: a wrong password is 401")
        # The right password's attempt goes once the database answers; the wrong one stays.
        until(lambda: len(failed_logins(db, "id")) <= 1, seconds=2.5)
        left = failed_logins(db, "id")
        assert len(left) == 1, (
            f"15: {len(left)} failures left, not 1: a right password is forgotten once the "
            "database answers again, and a failure after it is kept (write_when_back)"
        )


def test_15_waits_for_the_database_are_bounded(app_dir, database_url):
    module = load_app(app_dir)

    async def waits():
        await module.database.connect()
        try:
            if database_url.startswith("sqlite"):
                return [await module.database.fetch_val("PRAGMA busy_timeout")]
            return [await module.database.fetch_val("SHOW statement_timeout")]
        finally:
            await module.database.disconnect()

    expected = [5000] if database_url.startswith("sqlite") else ["5s"]
    assert asyncio.run(waits()) == expected, (
        "15: a query waits for the database at most DATABASE_WAIT_SECONDS (database_options)"
    )


def test_15_openapi_declares_503_on_every_route(client):
    schema = client.get("/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            answer = operation["responses"].get("503", {})
            content = answer.get("content", {}).get("application/json", {})
            assert content.get("schema") == {"$ref": "#/components/schemas/ErrorOut"}, (
                f"15: {method.upper()} {path} should declare its 503 (responses= of the app)"
            )


def test_15_a_refresh_waits_for_its_turn_at_most_a_while(app_dir, monkeypatch):
    module = load_app(app_dir)
    patch_app(monkeypatch, module, "refreshes_one_at_a_time", HeldForThreeSeconds())
    patch_app(monkeypatch, module, "DATABASE_WAIT_SECONDS", 1)
    with TestClient(module.app) as client:
        register(client)
        token = log_in_for_a_pair(client)["refresh_token"]
        started = time.monotonic()
        answer = refresh(client, token)
        took = time.monotonic() - started
    expect(
        answer, 503, "15: a refresh waits for its turn at most DATABASE_WAIT_SECONDS (held_within)"
    )
    assert answer.headers.get("retry-after") == "1", "15: say when: Retry-After"
    assert took < 2.5, f"15: the refresh waited {took:.1f} s for its turn, not at most 1"


def test_15_a_login_waits_for_the_claims_before_it_at_most_a_while(app_dir):
    # On PostgreSQL, a request waiting for the lock may hold the connection its holder needs.
    module = load_app(app_dir)

    async def wait_behind_a_held_lock():
        lock = asyncio.Lock()
        await lock.acquire()
        async with module.held_within(lock, 0.1):
            pass

    with pytest.raises(TimeoutError):
        asyncio.run(wait_behind_a_held_lock())
