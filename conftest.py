"""One clear line for every failing checkpoint: the section to reread, then the file checked.

    2.2 (my_main.py): GET /clothes/ should answer 200, got 404: {"detail":"Not Found"}
    3.2 (my_main.py): line 211, in is_admin: AttributeError: 'State' object has no ...

A test's section comes from its name (test_2_1_... checks 2.1). Run pytest with
--tb=long to see the full traceback instead.
"""

import gc
import os
import re
from pathlib import Path

import pytest
import sqlalchemy

import steps


HERE = Path(__file__).resolve().parent
APP_FILE = Path(os.environ.get("LESSON_APP", HERE / "main.py")).resolve()
TEST_SECTION = re.compile(r"test_(\d+)(?:_(\d+))?_")
STARTS_WITH_SECTION = re.compile(r"(\d+(?:\.\d+)?)(?=[:\s])[:\s]*")

# Errors whose cause lies in another section than the one being checked.
HINTS = {
    "'State' object has no attribute 'user'": (
        "3.2",
        "request.state.user is set by oauth2_scheme (2.1): is_admin must run after it",
    ),
    "no such column: users.role": ("3.1", "the users table has no role column"),
    "no such column: role": ("3.1", "the users table has no role column"),
    'column "role" does not exist': ("3.1", "the users table has no role column"),
    "hash could not be identified": (
        "4",
        "pwd_context.verify takes the typed password first, then the stored hash (1.3)",
    ),
    "no such column: users.token_version": ("6", "the users table has no token_version column"),
    'column "token_version" does not exist': ("6", "the users table has no token_version column"),
}


def section_of(test_name: str) -> str | None:
    match = TEST_SECTION.match(test_name)
    if match is None:
        return None
    return f"{match[1]}.{match[2]}" if match[2] else match[1]


def shown_path() -> str:
    try:
        return str(APP_FILE.relative_to(Path.cwd()))
    except ValueError:
        return str(APP_FILE)


def describe(error: BaseException, traceback) -> str:
    """What went wrong, in the words a student needs, starting with a section if we know it."""
    if isinstance(error, (AssertionError, pytest.fail.Exception)):
        # Keep the test's own message; pytest's "assert a == b" detail follows it.
        return str(error).split("\nassert ")[0]
    missing = getattr(error, "name", None)
    if isinstance(error, (NameError, AttributeError)) and missing:
        section = steps.introduced_in(steps.MAIN.read_text(), missing)
        if section:
            return f"{section}: {missing} is missing or comes too late; section {section} adds it"
    if isinstance(error, sqlalchemy.exc.DBAPIError):
        text = f"the database refused a query: {error.orig}"
    elif isinstance(error, SystemExit) and isinstance(error.code, int):
        text = f"the command stopped with exit status {error.code}: does main() add it?"
    else:
        text = f"{type(error).__name__}: {error}"
    in_app = [entry for entry in traceback if Path(entry.path) == APP_FILE]
    if in_app:
        text = f"line {in_app[-1].lineno + 1}, in {in_app[-1].name}: {text}"
    for clue, (section, hint) in HINTS.items():
        if clue in text:
            return f"{section}: {hint}. {text}"
    return text


def pytest_collection_finish(session):
    # What is loaded by now (pytest, FastAPI, SQLAlchemy) lives until the end: keep it out of
    # the garbage collector's full sweeps, which each test's new app makes frequent.
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    section = section_of(item.name)
    if (
        report.failed
        and call.excinfo is not None
        and section is not None
        and item.config.option.tbstyle == "auto"
    ):
        text = describe(call.excinfo.value, call.excinfo.traceback)
        match = STARTS_WITH_SECTION.match(text)
        if match:
            section, text = match[1], text[match.end() :]
        report.longrepr = f"{section} ({shown_path()}): {text}"
    return report
