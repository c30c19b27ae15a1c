"""Attack and fault checks against the real server: the second stage of .ci/run.

    python .ci/live_checks.py [--app PATH]      (needs schemathesis, which .ci/run installs)

It copies main.py (or the app file PATH) into a temporary directory, writes a .env
there, starts `uvicorn main:app` on 127.0.0.1, attacks it over HTTP from this process,
and stops it. Then `uvicorn main:app --workers 4`: on SQLite with no secret set, and on
the PostgreSQL database TEST_DATABASE_URL names, if set (it drops its public schema).
One line per check, then "N passed, M failed"; exit 1 if any failed.
"""

import argparse
import http.client
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from pathlib import Path

import jwt
import sqlalchemy

# servers is .ci/servers.py, beside this script: the server helpers both checks use.
from servers import environment
from servers import exit_with_summary
from servers import launch
from servers import report
from servers import results
from servers import server_log
from servers import servers
from servers import start_server
from servers import stop_server


ROOT = Path(__file__).resolve().parent.parent
APP_FILE = ROOT / "main.py"  # --app changes it
SECRET = secrets.token_urlsafe(48)
PASSWORD = "password123"
USER = {"email": "user@example.com", "password": PASSWORD, "full_name": "User"}
LOGIN = {"email": USER["email"], "password": PASSWORD}
workdirs = []  # every temporary directory, removed at the end if all passed


# --- The server ---------------------------------------------------------------


def new_workdir():
    """A temporary directory holding a copy of the app file, as main.py."""
    workdir = Path(tempfile.mkdtemp(prefix="live-checks-"))
    shutil.copy(APP_FILE, workdir / "main.py")
    workdirs.append(workdir)
    return workdir


def workers_started(server, workers):
    """Wait until every worker of `uvicorn --workers` has started: False if one failed."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        if server_log(server).count("Application startup complete.") == workers:
            return True
        time.sleep(0.2)
    return False  # uvicorn stops itself when a worker fails to start


def log_errors(log):
    """What went wrong in a server log: '' if nothing, else the first exception, short."""
    if "Traceback" not in log and "ERROR" not in log:
        return ""
    raised = [line for line in log.splitlines() if "Error: " in line and "ERROR" not in line]
    return (raised or ["ERROR in the log"])[0][:100]


def call(server, method, path, body=None, token=None, headers=()):
    """One request on a new connection: (status, JSON body or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest(method, path)
        if token:
            connection.putheader("Authorization", f"Bearer {token}")
        for name, value in headers:  # a list, so a header may come twice
            connection.putheader(name, value)
        data = json.dumps(body).encode() if body is not None else b""
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text
    finally:
        connection.close()


def detail(answer):
    """An error's "detail", short: for a 422, its first message."""
    if not isinstance(answer, dict):
        return str(answer)[:60]
    found = answer.get("detail")
    return found[0]["msg"] if isinstance(found, list) else found


# --- The checks ---------------------------------------------------------------


def expect(server, name, allowed, method, path, body=None, headers=()):
    """One hostile request: PASS if its status is one of those allowed."""
    try:
        status, answer = call(server, method, path, body, headers=headers)
        seen = f"{status} {'OK' if status < 300 else detail(answer)}"
    except OSError as error:
        status, seen = None, f"no answer ({error!r})"
    wanted = " or ".join(map(str, allowed))
    report(f"hostile: {name}", status in allowed, f"{seen} (want {wanted})")


def hostile_tokens(server, token):
    """Forged tokens and odd headers: a clear 4xx each, never a 5xx."""

    def bearer(alg="HS256", **claims):
        payload = {"sub": "1", "exp": datetime.now(timezone.utc) + timedelta(hours=1)}
        forged = jwt.encode({**payload, **claims}, SECRET, algorithm=alg)
        return [("Authorization", f"Bearer {forged}")]

    future = datetime.now(timezone.utc) + timedelta(hours=1)
    cases = [
        ("HS512 with the right secret", [401], bearer("HS512")),
        ('sub "1 OR 1=1"', [401], bearer(sub="1 OR 1=1")),
        ('sub "-1"', [401], bearer(sub="-1")),
        ('sub "1e3"', [401], bearer(sub="1e3")),
        ("exp is a string", [401], bearer(exp="tomorrow")),
        ("nbf in the future", [401], bearer(nbf=future)),
        # Refused by the HTTP parser (400, 431) or as a bad token (401).
        (
            "100 kB Authorization header",
            [400, 401, 431],
            [("Authorization", "Bearer " + "A" * 100_000)],
        ),
        # RFC 7235: the scheme is case-insensitive, so a good token still counts.
        ("lower-case bearer, valid token", [200], [("Authorization", f"bearer {token}")]),
        # Which of two headers counts depends on who reads them: refuse both.
        (
            "two Authorization headers, valid first",
            [401],
            [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer junk")],
        ),
        (
            "two Authorization headers, valid last",
            [401],
            [("Authorization", "Bearer junk"), ("Authorization", f"Bearer {token}")],
        ),
    ]
    for name, allowed, headers in cases:
        expect(server, name, allowed, "GET", "/clothes/", headers=headers)
    expect(
        server,
        "the server still serves a valid token",
        [200],
        "GET",
        "/clothes/",
        headers=[("Authorization", f"Bearer {token}")],
    )


def hostile_passwords(server):
    """Passwords bcrypt cannot take: refused up front, never a 500 from bcrypt."""
    nul = {"email": "nul@example.com", "password": "pass\x00word", "full_name": "N"}
    expect(server, "register, NUL in the password", [422], "POST", "/register", nul)
    # Logins of an existing user reach bcrypt; 401 or 422 both tell nothing.
    for name, password in [("NUL in", "pass\x00word"), ("100-byte", "x" * 100)]:
        login = {**LOGIN, "password": password}
        expect(server, f"login, {name} password", [401, 422], "POST", "/login", login)


def concurrent_registration(server, database_url, name="25 registrations of one email at once"):
    """25 registrations of one email at once: one 201, 24 409, one row."""
    email = "same@example.com"
    start = threading.Barrier(25)
    statuses = []

    def register():
        start.wait()
        body = {"email": email, "password": PASSWORD, "full_name": "Twin"}
        statuses.append(call(server, "POST", "/register", body)[0])

    threads = [threading.Thread(target=register) for _ in range(25)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine = sqlalchemy.create_engine(database_url)
    with engine.connect() as connection:
        count = sqlalchemy.text("SELECT count(*) FROM users WHERE email = :email")
        rows = connection.execute(count, {"email": email}).scalar()
    engine.dispose()
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    ok = counts == {201: 1, 409: 24} and rows == 1
    report(name, ok, f"statuses {counts}, {rows} row")


def fuzz(server, workdir, who, token):
    """schemathesis: every operation, answers must match what /openapi.json declares."""
    url = f"http://127.0.0.1:{server.port}/openapi.json"
    checks = ["not_a_server_error", "status_code_conformance"]
    checks += ["response_schema_conformance", "content_type_conformance"]
    command = [sys.executable, "-m", "schemathesis.cli", "run", url]
    command += ["--header", f"Authorization: Bearer {token}", "--checks", ",".join(checks)]
    command += ["--max-examples", "200", "--generation-database", "none"]
    command += ["--request-timeout", "30", "--no-color", "--warnings", "off"]
    try:
        run = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return report(f"fuzz with the {who}'s token", False, "timed out after 120 s")
    lines = (run.stdout.strip() or run.stderr.strip() or "no output").splitlines()
    report(f"fuzz with the {who}'s token", run.returncode == 0, lines[-1].strip("= "))
    if run.returncode != 0:  # schemathesis's account of each failure, indented
        failures = [i for i, line in enumerate(lines) if "FAILURES" in line][:1]
        shown = lines[failures[0] :] if failures else lines
        print("\n".join("    " + line for line in shown[:100]), flush=True)


def logout_while_requests_are_in_flight(server):
    """Once POST /logout has answered 204, no request with the old token gets through."""
    token = call(server, "POST", "/login", LOGIN)[1]["token"]
    seen = []  # (when the request was sent, its status, its detail)
    stop = threading.Event()

    def keep_reading():
        deadline = time.monotonic() + 10  # bounded, even if stop is never set
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            status, answer = call(server, "GET", "/clothes/", token=token)
            seen.append((sent, status, detail(answer) if status != 200 else ""))

    readers = [threading.Thread(target=keep_reading) for _ in range(8)]
    for reader in readers:
        reader.start()
    time.sleep(0.5)
    status, _ = call(server, "POST", "/logout", token=token)
    answered = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for reader in readers:
        reader.join()
    after = [(status, text) for sent, status, text in seen if sent > answered]
    passed_after = [entry for entry in after if entry != (401, "Token revoked.")]
    errors = [entry for entry in seen if entry[1] >= 500]
    ok = status == 204 and after and not passed_after and not errors
    report(
        "logout while 8 clients read with the same token",
        ok,
        f"logout {status}; {len(seen) - len(after)} reads before its answer, "
        f"{len(after)} after, {len(passed_after)} of those not 'Token revoked.', "
        f"{len(errors)} 5xx",
    )


def restart(workdir, server):
    """Same .env and database after a restart: data and tokens survive."""
    # The fuzz runs sent POST /logout, which took the older tokens back: log in again.
    token = call(server, "POST", "/login", LOGIN)[1]["token"]
    _, before = call(server, "GET", "/clothes/", token=token)
    stop_server(server)
    server = start_server(workdir)
    status, after = call(server, "GET", "/clothes/", token=token)
    kept = status == 200 and len(after) == len(before) > 0
    report(
        "restart: old token works, clothes kept",
        kept,
        f"{status}, {len(after) if status == 200 else 0} of {len(before)} clothes",
    )
    status, _ = call(server, "POST", "/login", LOGIN)
    report("restart: the user can still log in", status == 200, status)
    stop_server(server)

    # An environment variable beats .env: the same database, a new secret.
    server = start_server(workdir, JWT_SECRET=secrets.token_urlsafe(48))
    status, answer = call(server, "GET", "/clothes/", token=token)
    ok = (status, detail(answer)) == (401, "Invalid token.")
    report("restart with a new JWT_SECRET: old token refused", ok, f"{status} {detail(answer)}")
    stop_server(server)


def tokens_on_many_connections(server, token):
    """40 requests with one token, each on a new connection: different workers answer."""
    statuses = [call(server, "GET", "/clothes/", token=token)[0] for _ in range(40)]
    return statuses.count(200) == 40, f"{statuses.count(200)} of 40 answered 200"


def start_four_workers(workdir, name, **settings):
    """`uvicorn main:app --workers 4`, or None (and a FAIL) if a worker did not start."""
    server = launch(workdir, 4, **settings)
    if workers_started(server, 4):
        return server
    stop_server(server)
    report(f"{name}: every worker starts", False, log_errors(server_log(server)))
    return None


def token_on_40_connections(server, name, token):
    # Each request on a new connection, so any of the workers may answer it.
    statuses = [call(server, "GET", "/clothes/", token=token)[0] for _ in range(40)]
    report(name, statuses.count(200) == 40, f"{statuses.count(200)} of 40 answered 200")


def workers_share_one_secret():
    """4 workers, no .env and no JWT_SECRET: one secret, kept beside main.py for all."""
    workdir = new_workdir()
    name = "4 workers, no JWT_SECRET"
    server = start_four_workers(workdir, name, BCRYPT_ROUNDS="4")
    if server is None:
        return
    token = call(server, "POST", "/register", USER)[1]["token"]
    token_on_40_connections(server, f"{name}: a token works on 40 new connections", token)
    stop_server(server)
    server = start_four_workers(workdir, name, BCRYPT_ROUNDS="4")
    if server is None:
        return
    token_on_40_connections(server, f"{name}: the token works after a restart", token)
    stop_server(server)
    kept = workdir / ".jwt_secret"
    mode = oct(stat.S_IMODE(kept.stat().st_mode)) if kept.exists() else "no file"
    report(f"{name}: kept in .jwt_secret, mode 0600", mode == "0o600", mode)
    log = (workdir / "server.log").read_text()
    said = log.count("JWT_SECRET is not set")
    report(f"{name}: the log says so once in 2 starts", said == 1, f"{said} times")
    error = log_errors(log)
    report(f"{name}: no error in any worker's log", not error, error or "none")


def empty_schema(database_url):
    """PostgreSQL as on a new machine: no tables, no enum types."""
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE"))
        connection.execute(sqlalchemy.text("CREATE SCHEMA public"))
    engine.dispose()


def postgresql_workers(database_url):
    """4 workers create the tables at once: 5 cold starts, then racing registrations."""
    workdir = new_workdir()
    settings = {"DATABASE_URL": database_url, "JWT_SECRET": SECRET, "BCRYPT_ROUNDS": "4"}
    seen = []
    for _ in range(5):
        empty_schema(database_url)
        server = launch(workdir, 4, **settings)
        started = workers_started(server, 4)
        status = call(server, "GET", "/openapi.json")[0] if started else "no answer"
        stop_server(server)
        error = log_errors(server_log(server))
        seen.append("clean" if status == 200 and not error else f"{status}, {error}")
    report(
        "PostgreSQL, 4 workers: 5 cold starts on an empty schema",
        seen == ["clean"] * 5,
        "; ".join(seen),
    )
    name = "PostgreSQL, 4 workers"
    server = start_four_workers(workdir, name, **settings)
    if server is None:
        return
    concurrent_registration(server, database_url, f"{name}: 25 registrations of one email")
    stop_server(server)
    error = log_errors(server_log(server))
    report(f"{name}: no error in the log while registering", not error, error or "none")


def main():
    global APP_FILE
    parser = argparse.ArgumentParser(description="Live checks against uvicorn main:app.")
    parser.add_argument(
        "--app", type=Path, default=APP_FILE, help="the app file to check (default: main.py)"
    )
    APP_FILE = parser.parse_args().app.resolve()
    workdir = new_workdir()
    # No DATABASE_URL: the app's default, clothes.db beside main.py, is in workdir.
    (workdir / ".env").write_text(f"JWT_SECRET={SECRET}\nBCRYPT_ROUNDS=4\n")
    database_url = f"sqlite:///{workdir / 'clothes.db'}"
    server = start_server(workdir)
    try:
        user_token = call(server, "POST", "/register", USER)[1]["token"]
        subprocess.run(
            [sys.executable, "main.py", "create-user", "admin@example.com"],
            cwd=workdir,
            input=PASSWORD + "\n",
            text=True,
            check=True,
            capture_output=True,
            env=environment(),
        )
        admin = {"email": "admin@example.com", "password": PASSWORD}
        admin_token = call(server, "POST", "/login", admin)[1]["token"]
        shirt = {
            "name": "Shirt",
            "photo_url": "https://example.com/s.jpg",
            "size": "m",
            "color": "pink",
        }
        call(server, "POST", "/clothes/", shirt, token=admin_token)

        hostile_tokens(server, user_token)
        hostile_passwords(server)
        concurrent_registration(server, database_url)
        fuzz(server, workdir, "user", user_token)
        fuzz(server, workdir, "admin", admin_token)
        logout_while_requests_are_in_flight(server)
        restart(workdir, server)  # stops the server itself
        tracebacks = (workdir / "server.log").read_text().count("Traceback")
        report("no traceback in the server log", tracebacks == 0, f"{tracebacks} found")
        workers_share_one_secret()
        if os.environ.get("TEST_DATABASE_URL"):
            postgresql_workers(os.environ["TEST_DATABASE_URL"])
        else:
            print("SKIP  PostgreSQL with 4 workers: TEST_DATABASE_URL is not set", flush=True)
    finally:
        for server in servers:
            if server.poll() is None:
                stop_server(server)
    for workdir in workdirs:
        if all(results):
            shutil.rmtree(workdir)
        else:
            print(f"A server's log is kept in {workdir / 'server.log'}")
    exit_with_summary()


if __name__ == "__main__":
    main()
