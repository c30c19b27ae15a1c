"""How the lesson app holds up under load: python bench.py (about 2 minutes).

It copies main.py into a temporary directory, starts the real server there
(uvicorn on 127.0.0.1, a fresh SQLite database, the default bcrypt cost), and
drives it from this process, so the load never shares the server's event loop.
Two more servers read the same database, for comparison: the app with the token
check overridden, and a plain sync SQLAlchemy app; a small script then times the
token check's query alone, in one process. Every figure is the median of
ROUNDS rounds, and each section shows the load average it started at: other
programs on the machine slow every figure down. The servers stop at the end, then
the test suite is timed. It prints figures and goals; it asserts nothing.

BENCH_DATABASE_URL=postgresql://... python bench.py measures on PostgreSQL
instead. It empties that database first: give it a throwaway one.
"""

import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import sqlalchemy


ROOT = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
ROUNDS = 3
USER = {"email": "reader@example.com", "password": "password123", "full_name": "Reader"}
LOGIN = {"email": USER["email"], "password": USER["password"]}
TEST_COMMAND = [sys.executable, "-m", "pytest", "-W", "error", "-q"]
POSTGRESQL_URL = os.environ.get("BENCH_DATABASE_URL")
goals = []  # (goal, met), for the summary at the end

# The same app on the same data, with the token check overridden by an async
# dependency: FastAPI awaits it on the event loop, as it awaits the real one.
NO_AUTH_SERVER = """
import sys, uvicorn, main

async def no_token_check():
    return None

main.app.dependency_overrides[main.oauth2_scheme] = no_token_check
uvicorn.run(main.app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

# The same 20 rows read the sync way, without a token: a plain def route (FastAPI
# runs it in a worker thread), one SQLAlchemy connection per request from the
# engine's pool, and a response model with the same fields as the app's.
SYNC_SERVER = """
import sys
from datetime import datetime

import sqlalchemy, uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

engine = sqlalchemy.create_engine(sys.argv[2])
app = FastAPI()

class Clothes(BaseModel):
    id: int
    name: str
    photo_url: str
    size: str
    color: str
    created_at: datetime
    last_modified_at: datetime

@app.get("/clothes/", response_model=list[Clothes])
def get_all_clothes():
    with engine.connect() as connection:
        return connection.execute(sqlalchemy.text("SELECT * FROM clothes")).mappings().all()

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

# The token check's own query, the user row, timed alone in one process on the
# same database. A 2 ms pause before each, as between one client's requests, so
# the threads are asleep when the query comes, as they are in the server.
# On SQLite, sqlite3 and aiosqlite run the same SQL for comparison.
# Prints the p50 of each in ms, as JSON.
QUERY_SCRIPT = """
import asyncio, json, sqlite3, statistics, time
import aiosqlite, main

SQL = "SELECT * FROM users WHERE id = 1"

async def p50_ms(query):
    times = []
    for _ in range(300):
        await asyncio.sleep(0.002)
        started = time.perf_counter()
        await query()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)

async def measure():
    async def with_databases():
        await main.database.fetch_one(main.users.select().where(main.users.c.id == 1))
    async def open_and_close():
        async with main.database.connection():
            pass
    figures = {}
    if main.DATABASE_URL.startswith("sqlite"):
        plain = sqlite3.connect(main.engine.url.database)
        async def with_sqlite3():
            plain.execute(SQL).fetchone()
        figures["sqlite3"] = await p50_ms(with_sqlite3)
        async with aiosqlite.connect(main.engine.url.database) as threaded:
            async def with_aiosqlite():
                await threaded.execute_fetchall(SQL)
            figures["aiosqlite"] = await p50_ms(with_aiosqlite)
    await main.database.connect()
    async with main.database.connection():
        figures["databases"] = await p50_ms(with_databases)
    figures["connection"] = await p50_ms(open_and_close)
    await main.database.disconnect()
    print(json.dumps(figures))

asyncio.run(measure())
"""


# --- Servers and clients ------------------------------------------------------


def start_server(workdir, script=None):
    """uvicorn main:app, or the given Python script, on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if script:
        command = [sys.executable, "-c", script, str(port), database_url(workdir)]
    else:
        command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=workdir, env=server_environment(workdir))
    for _ in range(100):
        try:
            Client(port).request("GET", "/openapi.json")
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("The server did not start.")


def database_url(workdir):
    return POSTGRESQL_URL or f"sqlite:///{workdir / 'clothes.db'}"


def fresh_database():
    """On PostgreSQL, drop every table a run before left: the app creates them again."""
    if POSTGRESQL_URL:
        engine = sqlalchemy.create_engine(POSTGRESQL_URL)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()


def server_environment(workdir):
    # No BCRYPT_ROUNDS, so the app hashes at its default cost.
    settings = ("JWT_SECRET", "BCRYPT_ROUNDS", "JWT_EXPIRES_MINUTES")
    environment = {k: v for k, v in os.environ.items() if k not in settings}
    environment["JWT_SECRET"] = (workdir / "secret").read_text()
    environment["DATABASE_URL"] = database_url(workdir)
    return environment


def stop_server(server):
    server.terminate()
    server.wait(timeout=30)


class Client:
    """One keep-alive connection, as a browser keeps one."""

    def __init__(self, port):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method, path, body=None, token=None, expect=200):
        """Send one request; return its latency in seconds, and keep its answer."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        self.connection.request(method, path, body and json.dumps(body), headers)
        response = self.connection.getresponse()
        self.answer = response.read()
        if response.status != expect:
            raise RuntimeError(f"{method} {path}: {response.status} {self.answer[:200]}")
        return time.perf_counter() - started


def in_threads(count, work):
    """Run work() in count threads at once; return their results (or raise their error)."""
    with ThreadPoolExecutor(count) as pool:
        running = [pool.submit(work) for _ in range(count)]
        return [future.result() for future in running]


def ms(latencies, percent):
    return 1000 * statistics.quantiles(latencies, n=100, method="inclusive")[percent - 1]


def row(label, *cells):
    """One line of the table: numbers get one decimal, text stays as it is."""
    cells = [f"{cell:.1f}" if isinstance(cell, float) else cell for cell in cells]
    print(f"   {label:<34}" + "".join(f"{cell:>10}" for cell in cells), flush=True)


def heading(text):
    print(f"\n{text} (load average {os.getloadavg()[0]:.1f})", flush=True)


def goal(text, met):
    goals.append((text, met))
    print(f"   goal: {text}: {'met' if met else 'MISSED'}", flush=True)


def medians(measure, *args):
    """Run a measurement ROUNDS times; return the median of each figure it gives."""
    runs = [measure(*args) for _ in range(ROUNDS)]
    return [statistics.median(figures) for figures in zip(*runs, strict=True)]


# --- Measurements -------------------------------------------------------------


def reads_during_logins(port, token, logins, count=300):
    """Why: a login's hash must not make everyone else wait. One reader's
    p50, p90 and p99 in ms while `logins` clients log in over and over."""
    stop = threading.Event()

    def log_in():
        client = Client(port)
        while not stop.is_set():
            client.request("POST", "/login", LOGIN)

    with ThreadPoolExecutor(max(logins, 1)) as pool:
        running = [pool.submit(log_in) for _ in range(logins)]
        time.sleep(0.5 if logins else 0)  # let the hashing queue fill up
        reader = Client(port)
        latencies = [reader.request("GET", "/clothes/", token=token) for _ in range(count)]
        stop.set()
        for future in running:
            future.result()  # raises if a login failed
    return ms(latencies, 50), ms(latencies, 90), ms(latencies, 99)


def hashing_rate(port, path, clients=4 * CORES, each=3):
    """Why: every login and register costs one hash. Requests/s with many at once."""

    def client():
        connection = Client(port)
        for _ in range(each):
            if path == "/login":
                connection.request("POST", path, LOGIN)
            else:  # a new email each time: a taken one is a 409 without a hash
                email = f"user-{secrets.token_hex(8)}@example.com"
                body = {**USER, "email": email}
                connection.request("POST", path, body, expect=201)

    started = time.perf_counter()
    in_threads(clients, client)
    return [clients * each / (time.perf_counter() - started)]


def one_hash_seconds(cost):
    """Why: the ceiling. No server can log in more than cores / this per second."""
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        bcrypt.hashpw(b"password123", bcrypt.gensalt(cost))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tests_seconds(*selection):
    """Why: a slow suite is a suite nobody runs. The README's command, timed."""
    # As a student runs it: SQLite only, on main.py. Leaves no .pytest_cache or __pycache__.
    skip = ("TEST_DATABASE_URL", "LESSON_APP")
    environment = {k: v for k, v in os.environ.items() if k not in skip}
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    command = TEST_COMMAND + ["-p", "no:cacheprovider", *selection]
    started = time.perf_counter()
    run = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900
    )
    lines = (run.stdout.strip() or "no output").splitlines()
    return time.perf_counter() - started, f"exit status {run.returncode}: {lines[-1].strip('= ')}"


# --- The run ------------------------------------------------------------------


def prepare(workdir, port):
    """An admin adds 20 clothes; a plain user gets the token the readers send."""
    subprocess.run(
        [sys.executable, "main.py", "create-user", "admin@example.com"],
        cwd=workdir,
        env=server_environment(workdir),
        input="password123\n",
        text=True,
        check=True,
        capture_output=True,
    )
    client = Client(port)
    client.request("POST", "/login", {"email": "admin@example.com", "password": "password123"})
    admin = json.loads(client.answer)["token"]
    for number in range(20):
        shirt = {
            "name": f"Shirt {number}",
            "photo_url": "https://example.com/s.jpg",
            "size": "m",
            "color": "pink",
        }
        client.request("POST", "/clothes/", shirt, token=admin, expect=201)
    client.request("POST", "/register", USER, expect=201)
    token = json.loads(client.answer)["token"]
    # The cost the server really hashed with, read from the stored hash: $2b$12$...
    engine = sqlalchemy.create_engine(database_url(workdir))
    with engine.connect() as connection:
        query = sqlalchemy.text("SELECT password FROM users WHERE email = :email")
        stored = connection.execute(query, {"email": USER["email"]}).scalar_one()
    engine.dispose()
    return token, int(stored.split("$")[2])


def idle_reads(ports, token):
    """Why: what one user waits for, and what the token check adds to it."""
    heading("1. Idle reads: one client sends GET /clothes/ (20 rows), nothing else runs")
    print("   (the sync app: the same rows from a def route, one SQLAlchemy connection a")
    print("   request, the same response fields, no token; its own uvicorn server)")
    row("", "p50 ms", "p90 ms")

    def in_turns():
        # Round after round in turns, so a slow moment of the machine hits all three alike.
        return sum((reads_during_logins(port, token, 0)[:2] for port in ports), ())

    figures = medians(in_turns)
    real, overridden, sync = figures[0:2], figures[2:4], figures[4:6]
    row("app, with a valid token", *real)
    row("app, authentication overridden", *overridden)
    row("sync SQLAlchemy app", *sync)
    overhead = [real[0] / overridden[0], real[1] / overridden[1]]
    row("with token / overridden", *[f"{ratio:.2f}" for ratio in overhead])
    row("with token / sync SQLAlchemy", f"{real[0] / sync[0]:.2f}", f"{real[1] / sync[1]:.2f}")
    shown = " and ".join(f"{ratio:.2f}" for ratio in overhead)
    goal(
        f"auth overhead, with token / overridden, 1.25 or less at p50 and p90: {shown}",
        max(overhead) <= 1.25,
    )
    goal(
        f"p90 with a token 1.5x the sync SQLAlchemy app's or less: {real[1] / sync[1]:.2f}x",
        real[1] <= 1.5 * sync[1],
    )
    return overridden


def query_costs(workdir, overridden):
    """Why: the token check's main cost is its query, the user row. How much is that?"""
    heading("1b. The user row alone, one query timed in one process, 2 ms apart")
    run = subprocess.run(
        [sys.executable, "-c", QUERY_SCRIPT],
        cwd=workdir,
        env=server_environment(workdir),
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(run.stdout)
    labels = {
        "sqlite3": "sqlite3, no thread",
        "aiosqlite": "aiosqlite, one trip to its thread",
        "databases": "databases fetch_one, as the app",
        "connection": "databases, open+close connection",
    }
    row("", "p50 ms")
    for key, label in labels.items():
        if key in figures:  # sqlite3 and aiosqlite on SQLite only
            row(label, f"{figures[key]:.2f}")
    # What the overhead would be if the token check cost only this query. An estimate:
    # timed apart from the server, the query need not cost the same as in it.
    estimate = (overridden[0] + figures["databases"]) / overridden[0]
    print(f"   overridden read + this query, / overridden read: {estimate:.2f} at p50")


def event_loop_health(port, token):
    """Why: a login's hash runs in a thread; reads must not queue behind it."""
    heading("2. Event-loop health: one client reads GET /clothes/ while others log in")
    row("", "p50 ms", "p90 ms", "p99 ms", "p90/idle")
    idle = None
    for logins in (0, CORES, 4 * CORES):
        p50, p90, p99 = medians(reads_during_logins, port, token, logins)
        idle = idle or p90  # the first line, with no logins, is the baseline
        label = f"{logins} logins in flight" if logins else "idle"
        row(label, p50, p90, p99, f"{p90 / idle:.2f}")
    goal(f"p90 under {4 * CORES} logins below 1.5x idle: {p90 / idle:.2f}x", p90 < 1.5 * idle)


def hashing_throughput(port, cost):
    """Why: main.py's hashing pool must use every core for logins."""
    heading(f"3. Login and register throughput, {4 * CORES} clients at once")
    seconds = one_hash_seconds(cost)
    ceiling = CORES / seconds
    print(
        f"   one hash takes {seconds:.3f} s: {CORES} cores hash at most "
        f"{ceiling:.1f} per second, the ceiling"
    )
    row("", "per s", "ceiling", "share")
    rates = {path: medians(hashing_rate, port, path)[0] for path in ("/login", "/register")}
    for path, rate in rates.items():
        row(f"POST {path}", rate, ceiling, f"{rate / ceiling:.0%}")
    share = rates["/login"] / ceiling
    goal(f"logins at 90% of the ceiling or more: {share:.0%}", share >= 0.9)


def test_times():
    heading("4. Tests, SQLite only, wall time with Python's start-up")
    for selection, limit in ((["-k", "test_2_1"], 3), ([], 10)):
        command = " ".join(["python", *TEST_COMMAND[1:], *selection])
        runs = [tests_seconds(*selection) for _ in range(ROUNDS)]
        took = statistics.median(seconds for seconds, _ in runs)
        print(f"   {command}: {took:.1f} s, {runs[-1][1]}")
        goal(f"{command} under {limit} s: {took:.1f} s", took < limit)


def main():
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    shutil.copy(ROOT / "main.py", workdir / "main.py")
    (workdir / "secret").write_text(secrets.token_urlsafe(32))
    servers = []
    fresh_database()
    try:
        server, port = start_server(workdir)
        servers.append(server)
        token, cost = prepare(workdir, port)
        print(
            f"bench.py, {time.strftime('%Y-%m-%d')}, {CORES} cores, bcrypt cost {cost}, "
            f"{'PostgreSQL' if POSTGRESQL_URL else 'SQLite'}, medians of {ROUNDS} rounds"
        )
        ports = [port]
        for script in (NO_AUTH_SERVER, SYNC_SERVER):
            other, other_port = start_server(workdir, script)
            servers.append(other)
            ports.append(other_port)
        for warm_up in ports:
            reads_during_logins(warm_up, token, 0, count=100)
        overridden = idle_reads(ports, token)
        query_costs(workdir, overridden)
        while len(servers) > 1:  # only the real app from here on
            stop_server(servers.pop())
        event_loop_health(port, token)
        hashing_throughput(port, cost)
    finally:
        for server in servers:
            stop_server(server)
        shutil.rmtree(workdir)
    test_times()
    missed = [text for text, met in goals if not met]
    print(f"\n{len(goals) - len(missed)} of {len(goals)} goals met" + (":" if missed else "."))
    for text in missed:
        print(f"   missed: {text}")


if __name__ == "__main__":
    main()
