"""Attack and fault checks against the real server: the second stage of .ci/run.

    python .ci/live_checks.py      (needs schemathesis, which .ci/run installs)

It copies main.py into a temporary directory, writes a .env there, starts
`uvicorn main:app` on 127.0.0.1, attacks it over HTTP from this process, and
stops it. One line per check, then "N passed, M failed"; exit 1 if any failed.
"""

import http.client
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
SECRET = secrets.token_urlsafe(48)
PASSWORD = "password123"
USER = {"email": "user@example.com", "password": PASSWORD, "full_name": "User"}
LOGIN = {"email": USER["email"], "password": PASSWORD}
# Settings come from the .env we write, never from whoever runs this script.
SETTINGS = ("JWT_SECRET", "DATABASE_URL", "BCRYPT_ROUNDS", "JWT_EXPIRES_MINUTES")
results = []
servers = []  # every server started, so none outlives this script


def report(name, ok, seen):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {seen}", flush=True)


# --- The server ---------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**settings):
    return {**{k: v for k, v in os.environ.items() if k not in SETTINGS}, **settings}


def start_server(workdir, **settings):
    port = free_port()
    with open(workdir / "server.log", "a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=workdir, env=environment(**settings), stdout=log, stderr=log,
        )
    server.port = port
    servers.append(server)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if call(server, "GET", "/openapi.json")[0] == 200:
                return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise SystemExit(f"The server did not start: see {workdir / 'server.log'}")


def stop_server(server):
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


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
        ("100 kB Authorization header", [400, 401, 431],
         [("Authorization", "Bearer " + "A" * 100_000)]),
        # RFC 7235: the scheme is case-insensitive, so a good token still counts.
        ("lower-case bearer, valid token", [200], [("Authorization", f"bearer {token}")]),
        # Which of two headers counts depends on who reads them: refuse both.
        ("two Authorization headers, valid first", [401],
         [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer junk")]),
        ("two Authorization headers, valid last", [401],
         [("Authorization", "Bearer junk"), ("Authorization", f"Bearer {token}")]),
    ]
    for name, allowed, headers in cases:
        expect(server, name, allowed, "GET", "/clothes/", headers=headers)
    expect(server, "the server still serves a valid token", [200], "GET", "/clothes/",
           headers=[("Authorization", f"Bearer {token}")])


def hostile_passwords(server):
    """Passwords bcrypt cannot take: refused up front, never a 500 from bcrypt."""
    nul = {"email": "nul@example.com", "password": "pass\x00word", "full_name": "N"}
    expect(server, "register, NUL in the password", [422], "POST", "/register", nul)
    # Logins of an existing user reach bcrypt; 401 or 422 both tell nothing.
    for name, password in [("NUL in", "pass\x00word"), ("100-byte", "x" * 100)]:
        login = {**LOGIN, "password": password}
        expect(server, f"login, {name} password", [401, 422], "POST", "/login", login)


def concurrent_registration(server, database):
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
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT count(*) FROM users WHERE email = ?", (email,))
        rows = rows.fetchone()[0]
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    ok = counts == {201: 1, 409: 24} and rows == 1
    report("25 registrations of one email at once", ok, f"statuses {counts}, {rows} row")


def fuzz(server, workdir, who, token):
    """schemathesis: every operation, answers must match what /openapi.json declares."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "run",
        f"http://127.0.0.1:{server.port}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", "not_a_server_error,status_code_conformance,"
        "response_schema_conformance,content_type_conformance",
        "--max-examples", "200", "--generation-database", "none",
        "--request-timeout", "30", "--no-color", "--warnings", "off",
    ]
    try:
        run = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        return report(f"fuzz with the {who}'s token", False, "timed out after 120 s")
    lines = (run.stdout.strip() or run.stderr.strip() or "no output").splitlines()
    report(f"fuzz with the {who}'s token", run.returncode == 0, lines[-1].strip("= "))
    if run.returncode != 0:  # schemathesis's account of each failure, indented
        failures = [i for i, line in enumerate(lines) if "FAILURES" in line][:1]
        shown = lines[failures[0]:] if failures else lines
        print("\n".join("    " + line for line in shown[:100]), flush=True)


def restart(workdir, server, token):
    """Same .env and database after a restart: data and tokens survive."""
    _, before = call(server, "GET", "/clothes/", token=token)
    stop_server(server)
    server = start_server(workdir)
    status, after = call(server, "GET", "/clothes/", token=token)
    kept = status == 200 and len(after) == len(before) > 0
    report("restart: old token works, clothes kept", kept,
           f"{status}, {len(after) if status == 200 else 0} of {len(before)} clothes")
    status, _ = call(server, "POST", "/login", LOGIN)
    report("restart: the user can still log in", status == 200, status)
    stop_server(server)

    # An environment variable beats .env: the same database, a new secret.
    server = start_server(workdir, JWT_SECRET=secrets.token_urlsafe(48))
    status, answer = call(server, "GET", "/clothes/", token=token)
    ok = (status, detail(answer)) == (401, "Invalid token.")
    report("restart with a new JWT_SECRET: old token refused", ok,
           f"{status} {detail(answer)}")
    stop_server(server)


def main():
    workdir = Path(tempfile.mkdtemp(prefix="live-checks-"))
    shutil.copy(ROOT / "main.py", workdir / "main.py")
    # No DATABASE_URL: the app's default, clothes.db beside main.py, is in workdir.
    (workdir / ".env").write_text(f"JWT_SECRET={SECRET}\nBCRYPT_ROUNDS=4\n")
    database = workdir / "clothes.db"
    server = start_server(workdir)
    try:
        user_token = call(server, "POST", "/register", USER)[1]["token"]
        subprocess.run([sys.executable, "main.py", "create-user", "admin@example.com"],
                       cwd=workdir, input=PASSWORD + "\n", text=True, check=True,
                       capture_output=True, env=environment())
        admin = {"email": "admin@example.com", "password": PASSWORD}
        admin_token = call(server, "POST", "/login", admin)[1]["token"]
        shirt = {"name": "Shirt", "photo_url": "https://example.com/s.jpg",
                 "size": "m", "color": "pink"}
        call(server, "POST", "/clothes/", shirt, token=admin_token)

        hostile_tokens(server, user_token)
        hostile_passwords(server)
        concurrent_registration(server, database)
        fuzz(server, workdir, "user", user_token)
        fuzz(server, workdir, "admin", admin_token)
        restart(workdir, server, user_token)  # stops the server itself
        tracebacks = (workdir / "server.log").read_text().count("Traceback")
        report("no traceback in the server log", tracebacks == 0, f"{tracebacks} found")
    finally:
        for server in servers:
            if server.poll() is None:
                stop_server(server)
    if all(results):
        shutil.rmtree(workdir)
    else:
        print(f"The server's log is kept in {workdir / 'server.log'}")
    print(f"{results.count(True)} passed, {results.count(False)} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
