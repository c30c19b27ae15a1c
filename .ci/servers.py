"""What live_checks.py and browser_check.py share: the app under uvicorn, and PASS/FAIL lines.

A script imports what it needs; `results` and `servers` are the lists it reads at the end.
"""

import http.client
import os
import socket
import subprocess
import sys
import time


# Settings come from the .env a script writes, never from whoever runs it.
SETTINGS = ("JWT_SECRET", "DATABASE_URL", "BCRYPT_ROUNDS", "JWT_EXPIRES_MINUTES")
SETTINGS += ("REFRESH_EXPIRES_DAYS", "SESSION_EXPIRES_DAYS")  # section 8
results = []  # True or False for each check reported
servers = []  # every server started, so none outlives the script


def report(name, ok, seen):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {seen}", flush=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**settings):
    return {**{k: v for k, v in os.environ.items() if k not in SETTINGS}, **settings}


def launch(workdir, workers=1, prefix=(), **settings):
    """uvicorn main:app in workdir, on a free port; its log goes to workdir/server.log.

    prefix: a command that execs the rest, such as setpriv: the server's process id stays
    that of uvicorn.
    """
    port = free_port()
    log_file = workdir / "server.log"
    log_start = log_file.stat().st_size if log_file.exists() else 0
    command = [*prefix, sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers)]
    with open(log_file, "a") as log:
        server = subprocess.Popen(
            command, cwd=workdir, env=environment(**settings), stdout=log, stderr=log
        )
    server.port, server.log_file, server.log_start = port, log_file, log_start
    servers.append(server)
    return server


def server_log(server):
    """What this server wrote to its log, and not the servers before it."""
    return server.log_file.read_bytes()[server.log_start :].decode(errors="replace")


def answers(server):
    """True once the server answers GET /openapi.json with 200."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/openapi.json")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def start_server(workdir, prefix=(), **settings):
    server = launch(workdir, prefix=prefix, **settings)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if answers(server):
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


def exit_with_summary():
    """The last line of a check script, and its exit status: 1 if any check failed."""
    print(f"{results.count(True)} passed, {results.count(False)} failed")
    sys.exit(0 if all(results) else 1)
