"""How the lesson app holds up under load: python bench.py (about 2 minutes).

It copies main.py into a temporary directory, starts the real server there
(uvicorn on 127.0.0.1, a fresh SQLite database, the default bcrypt cost), and
drives it from this process, so the load never shares the server's event loop.
Every figure is the median of ROUNDS rounds. The servers stop at the end.
"""

import http.client
import json
import os
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import bcrypt

ROOT = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
ROUNDS = 3
USER = {"email": "reader@example.com", "password": "password123", "full_name": "Reader"}
LOGIN = {"email": USER["email"], "password": USER["password"]}
TEST_COMMAND = [sys.executable, "-m", "pytest", "-W", "error", "-q"]

# The same app on the same data, with the token check overridden: no auth at all.
NO_AUTH_SERVER = """
import sys, uvicorn, main
main.app.dependency_overrides[main.oauth2_scheme] = lambda: None
uvicorn.run(main.app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


# --- Servers and clients ------------------------------------------------------

def start_server(workdir, no_auth=False):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if no_auth:
        command = [sys.executable, "-c", NO_AUTH_SERVER, str(port)]
    else:
        command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=workdir, env=server_environment(workdir))
    for _ in range(100):
        try:
            Client(port).request("GET", "/openapi.json")
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("The server did not start.")


def server_environment(workdir):
    # No BCRYPT_ROUNDS, so the app hashes at its default cost.
    settings = ("JWT_SECRET", "DATABASE_URL", "BCRYPT_ROUNDS", "JWT_EXPIRES_MINUTES")
    environment = {k: v for k, v in os.environ.items() if k not in settings}
    environment["JWT_SECRET"] = (workdir / "secret").read_text()
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
    print(f"   {label:<32}" + "".join(f"{cell:>10}" for cell in cells), flush=True)


def medians(measure, *args):
    """Run a measurement ROUNDS times; return the median of each figure it gives."""
    runs = [measure(*args) for _ in range(ROUNDS)]
    return [statistics.median(figures) for figures in zip(*runs)]


# --- Measurements -------------------------------------------------------------

def reads(port, token, clients=2 * CORES, each=250):
    """Why: the busiest route. Many readers at once: requests/s, p50 and p99 in ms."""
    def reader():
        client = Client(port)
        return [client.request("GET", "/clothes/", token=token) for _ in range(each)]

    started = time.perf_counter()
    latencies = sum(in_threads(clients, reader), [])
    return len(latencies) / (time.perf_counter() - started), ms(latencies, 50), ms(latencies, 99)


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


def test_suite_seconds():
    """Why: a slow suite is a suite nobody runs. The README's command, timed."""
    # No .pytest_cache or __pycache__ left behind in the repository.
    quiet = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    run = subprocess.run(TEST_COMMAND + ["-p", "no:cacheprovider"], cwd=ROOT, env=quiet,
                         capture_output=True, text=True, timeout=900)
    lines = (run.stdout.strip() or "no output").splitlines()
    return time.perf_counter() - started, run.returncode, lines[-1].strip("= ")


# --- The run ------------------------------------------------------------------

def prepare(workdir, port):
    """An admin adds 20 clothes; a plain user gets the token the readers send."""
    subprocess.run([sys.executable, "main.py", "create-user", "admin@example.com"],
                   cwd=workdir, env=server_environment(workdir), input="password123\n",
                   text=True, check=True, capture_output=True)
    client = Client(port)
    client.request("POST", "/login", {"email": "admin@example.com", "password": "password123"})
    admin = json.loads(client.answer)["token"]
    for number in range(20):
        shirt = {"name": f"Shirt {number}", "photo_url": "https://example.com/s.jpg",
                 "size": "m", "color": "pink"}
        client.request("POST", "/clothes/", shirt, token=admin, expect=201)
    client.request("POST", "/register", USER, expect=201)
    token = json.loads(client.answer)["token"]
    # The cost the server really hashed with, read from the stored hash: $2b$12$...
    with sqlite3.connect(workdir / "clothes.db") as database:
        query = "SELECT password FROM users WHERE email = ?"
        stored = database.execute(query, (USER["email"],)).fetchone()[0]
    return token, int(stored.split("$")[2])


def main():
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    shutil.copy(ROOT / "main.py", workdir / "main.py")
    (workdir / "secret").write_text(secrets.token_urlsafe(32))
    servers = []
    try:
        server, port = start_server(workdir)
        servers.append(server)
        token, cost = prepare(workdir, port)
        bare, bare_port = start_server(workdir, no_auth=True)
        servers.append(bare)
        for warm_up in (port, bare_port):
            reads(warm_up, token, each=50)

        load = os.getloadavg()[0]  # other programs running slow every figure down
        print(f"bench.py, {date.today()}, {CORES} cores (load average {load:.1f} before"
              f" the run), bcrypt cost {cost}, medians of {ROUNDS} rounds")

        print(f"\n1. Auth overhead: GET /clothes/ (20 rows), {2 * CORES} clients at once")
        row("", "req/s", "p50 ms", "p99 ms")
        # In turns, round after round, so a slow moment of the machine hits both alike.
        both = medians(lambda: reads(port, token) + reads(bare_port, token))
        with_auth, without = both[:3], both[3:]
        row("with a valid token", *with_auth)
        row("authentication overridden", *without)
        row("overridden / with token", f"{without[0] / with_auth[0]:.2f}")
        stop_server(servers.pop())

        print("\n2. Event-loop health: one client reads GET /clothes/ while others log in")
        row("", "p50 ms", "p90 ms", "p99 ms", "p90/idle")
        idle = None
        for logins in (0, CORES, 4 * CORES):
            p50, p90, p99 = medians(reads_during_logins, port, token, logins)
            idle = idle or p90  # the first line, with no logins, is the baseline
            label = f"{logins} logins in flight" if logins else "idle"
            row(label, p50, p90, p99, f"{p90 / idle:.2f}")
        slowdown = p90 / idle  # with the most logins in flight

        seconds = one_hash_seconds(cost)
        ceiling = CORES / seconds
        print(f"\n3. Login and register throughput, {4 * CORES} clients at once")
        print(f"   one hash takes {seconds:.3f} s: {CORES} cores hash at most "
              f"{ceiling:.1f} per second, the ceiling")
        row("", "per s", "ceiling", "share")
        rates = {path: medians(hashing_rate, port, path)[0] for path in ("/login", "/register")}
        for path, rate in rates.items():
            row(f"POST {path}", rate, ceiling, f"{rate / ceiling:.0%}")
        share = rates["/login"] / ceiling

        # The two sides of main.py's hashing pool: enough threads to use every
        # core for logins, at a priority low enough that reads still go first.
        print(f"\n   Balance: reads under {4 * CORES} logins at {slowdown:.2f}x idle p90"
              f" (goal: below 2), logins at {share:.0%} of the ceiling (goal: 50% or more)")
    finally:
        for server in servers:
            stop_server(server)
        shutil.rmtree(workdir)

    took, status, summary = test_suite_seconds()
    print(f"\n4. Test suite: {' '.join(['python'] + TEST_COMMAND[1:])}")
    print(f"   {took:.1f} s, exit status {status}: {summary}")


if __name__ == "__main__":
    main()
