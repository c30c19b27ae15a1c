"""A student's click-through of the Swagger docs in a real browser: a stage of .ci/run.

    python .ci/browser_check.py [--app PATH] [--screenshot PATH]

Needs playwright (pip) and Debian's chromium (apt-get): Playwright's own browser download
cannot work on CI. It copies main.py into a temporary directory, writes a .env there, starts
`uvicorn main:app` on 127.0.0.1, and clicks through lesson.md's Swagger steps in headless
Chromium, with every request to another host blocked: /docs must work offline. It saves the
lesson's screenshot. One line per check, then "N passed, M failed"; exit 1 if any failed.
"""

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect
from playwright.sync_api import sync_playwright

# servers is .ci/servers.py, beside this script: the server helpers both checks use.
from servers import environment
from servers import exit_with_summary
from servers import report
from servers import results
from servers import start_server
from servers import stop_server


ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the others stop it from calling home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EMAIL = "ada@example.com"
USER = {"email": EMAIL, "password": "correct horse", "full_name": "Ada Lovelace"}
SHIRT = {
    "name": "Linen shirt",
    "photo_url": "https://example.com/shirt.jpg",
    "size": "m",
    "color": "white",
}


# --- Swagger UI, as a student clicks it ---------------------------------------


def operation(page, method, path):
    """The block of one operation on the docs page, such as POST /register."""
    return page.locator(f'.opblock-{method}:has(.opblock-summary-path[data-path="{path}"])')


def try_it_out(page, method, path):
    block = operation(page, method, path)
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()


def execute(page, method, path, body=None):
    """Fill the body, click Execute: (status, body) as the page shows them."""
    block = operation(page, method, path)
    if body is not None:
        block.locator("textarea.body-param__text").fill(json.dumps(body, indent=2))
    # Wait for the answer itself, then for the page to show it: an earlier answer may be there.
    with page.expect_response(lambda r: r.url.endswith(path)) as answer:
        block.get_by_role("button", name="Execute").click()
    shown = block.locator(".live-responses-table tr.response")
    expect(shown.locator(".response-col_status")).to_have_text(str(answer.value.status))
    status = int(shown.locator(".response-col_status").inner_text())
    return status, json.loads(shown.locator("code.language-json").inner_text())


def authorize_dialog(page):
    """Click the Authorize button at the top of the page: the dialog it opens."""
    page.locator(".auth-wrapper .authorize").click()
    return page.locator(".modal-ux")


def walk(page, base, workdir, screenshot):
    """lesson.md's checkpoints 2.2, 3.2 and 5, clicked in Swagger."""
    page.goto(f"{base}/docs")
    page.locator(".opblock").first.wait_for()
    count = page.locator(".opblock").count()
    version = page.evaluate("window.versions.swaggerUI.version")
    report(
        "/docs shows Swagger UI",
        version.startswith("5."),
        f"Swagger UI {version}, {count} operations",
    )

    try_it_out(page, "post", "/register")
    status, answer = execute(page, "post", "/register", USER)
    token = answer.get("token", "")
    report(
        "POST /register",
        status == 201 and token.count(".") == 2,
        f"{status}, token {token[:12]}...",
    )

    # Swagger adds "Bearer " itself: the student pastes the bare token.
    dialog = authorize_dialog(page)
    dialog.locator("#auth-bearer-value").fill(token)
    dialog.get_by_text("Authorize", exact=True).click()
    authorized = dialog.get_by_text("Authorized", exact=True).is_visible()
    dialog.get_by_text("Close", exact=True).click()
    report(
        "Authorize with the token",
        authorized,
        "the dialog says Authorized" if authorized else "no Authorized in the dialog",
    )

    try_it_out(page, "get", "/clothes/")
    status, answer = execute(page, "get", "/clothes/")
    report("GET /clothes/ as a user", status == 200, f"{status} {answer} (want 200)")
    # The picture in lesson.md: GET /clothes/ from its heading down to the 200 it answered.
    section = page.locator(".opblock-tag-section", has=operation(page, "get", "/clothes/"))
    section.evaluate("section => section.scrollIntoView()")
    page.screenshot(path=screenshot)
    print(f"      saved the picture: {screenshot}", flush=True)

    try_it_out(page, "post", "/clothes/")
    status, answer = execute(page, "post", "/clothes/", SHIRT)
    report("POST /clothes/ as a user", status == 403, f"{status} {answer} (want 403)")

    # The lesson's section 5: make Ada an admin from the terminal, beside the server.
    command = subprocess.run(
        [sys.executable, "main.py", "set-role", EMAIL, "admin"],
        cwd=workdir,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = (command.stdout.strip() or command.stderr.strip() or "no output").splitlines()[-1]
    report("python main.py set-role ... admin", command.returncode == 0, said)

    status, answer = execute(page, "post", "/clothes/", SHIRT)
    report("POST /clothes/ as an admin", status == 201, f"{status} {answer.get('name')} (want 201)")

    dialog = authorize_dialog(page)
    dialog.get_by_text("Logout", exact=True).click()
    dialog.get_by_text("Close", exact=True).click()
    # "Not authenticated": Swagger sent no token at all, as after a real logout.
    status, answer = execute(page, "get", "/clothes/")
    ok = (status, answer) == (401, {"detail": "Not authenticated"})
    report("GET /clothes/ after Logout", ok, f"{status} {answer} (want 401 Not authenticated)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", type=Path, default=ROOT / "main.py", help="the main.py to run")
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=ROOT / "lesson-authorize.png",
        help="where to save the lesson's picture",
    )
    args = parser.parse_args()
    screenshot = args.screenshot.resolve()

    workdir = Path(tempfile.mkdtemp(prefix="browser-check-"))
    shutil.copy(args.app, workdir / "main.py")
    (workdir / ".env").write_text(
        f"JWT_SECRET={secrets.token_urlsafe(48)}\nBCRYPT_ROUNDS=4\n"
        f"DATABASE_URL=sqlite:///{workdir / 'clothes.db'}\n"
    )
    server = start_server(workdir)
    base = f"http://127.0.0.1:{server.port}"
    blocked = []  # every request the page made to another host
    errors = []  # JavaScript errors on the page

    def only_this_app(route):
        # The docs must need nothing but the app: abort anything else, and remember it.
        if route.request.url.startswith(base + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
            )
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", only_this_app)
            page = context.new_page()
            # Bounded waits everywhere: a missing button fails the check, never hangs it.
            page.set_default_timeout(15_000)
            expect.set_options(timeout=15_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            try:
                walk(page, base, workdir, screenshot)
            # AssertionError: the page showed another status; ValueError: a body not JSON.
            except (PlaywrightError, AssertionError, ValueError) as error:
                page.screenshot(path=workdir / "failed.png")
                # Playwright's message: what failed, then what it was waiting for.
                lines = str(error).strip().splitlines()[:4]
                report("the click-through", False, "\n    ".join(lines))
            browser.close()
    finally:
        stop_server(server)

    report(
        "nothing loaded from another host",
        not blocked,
        f"{len(blocked)} blocked" + "".join(f"\n    {url}" for url in blocked),
    )
    report(
        "no JavaScript error on the page",
        not errors,
        f"{len(errors)} found" + "".join(f"\n    {error}" for error in errors),
    )
    tracebacks = (workdir / "server.log").read_text().count("Traceback")
    report("no traceback in the server log", tracebacks == 0, f"{tracebacks} found")
    if all(results):
        shutil.rmtree(workdir)
    else:
        print(f"The server's log and the page are kept in {workdir}")
    exit_with_summary()


if __name__ == "__main__":
    main()
