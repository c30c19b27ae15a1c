"""lesson.md, steps.py and our own files agree with main.py.

These check the project, not a student's file, so they always read our main.py.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import steps


HERE = Path(__file__).resolve().parent
MAIN = (HERE / "main.py").read_text()
LESSON = (HERE / "lesson.md").read_text()
# <!-- section 1.2 --> right above the python block it marks.
MARKED_BLOCK = re.compile(r"^<!-- section (\S+) -->\n```python\n(.*?)^```$", re.M | re.S)
PYTHON_BLOCK = re.compile(r"^```python\n", re.M)
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.M | re.S)
K_OPTION = re.compile(r"pytest -k (\"[^\"]+\"|'[^']+'|\w+)")
# The core ends where "Going further" or the appendices begin.
CORE_END = re.compile(r"^## (Going further|Appendix)", re.M)

pytestmark = pytest.mark.filterwarnings("error")


def prose_words(markdown: str) -> int:
    without_code = re.sub(r"^```.*?^```$", "", markdown, flags=re.M | re.S)
    return len(without_code.split())


def test_lesson_shows_what_each_section_adds():
    shown = {}
    for section, code in MARKED_BLOCK.findall(LESSON):
        shown.setdefault(section, []).append(code)
    for section in steps.sections(MAIN):
        assert shown.pop(section, []) == steps.additions(MAIN, section), (
            f"lesson.md's blocks for {section} differ from what {section} adds to main.py "
            f"(python steps.py {section} shows the file)"
        )
    assert not shown, f"lesson.md marks sections main.py does not have: {sorted(shown)}"


def test_every_python_block_of_the_core_is_marked():
    core = LESSON[: CORE_END.search(LESSON).start()]
    unmarked = len(PYTHON_BLOCK.findall(core)) - len(MARKED_BLOCK.findall(core))
    assert unmarked == 0, f"{unmarked} python blocks in the core are not marked with a section"


def test_lesson_word_counts():
    core = LESSON[: CORE_END.search(LESSON).start()]
    assert prose_words(core) <= 4000, f"the core has {prose_words(core)} words of prose"
    # The whole lesson: the core, three Going further sections and the appendices.
    assert prose_words(LESSON) <= 8000, f"the lesson has {prose_words(LESSON)} words of prose"


def test_each_going_further_section_is_short():
    # Each is taught on its own, after the core: at most 800 words of prose.
    starts = [match.start() for match in re.finditer(r"^## ", LESSON, flags=re.M)]
    for start, end in zip(starts, starts[1:] + [len(LESSON)], strict=True):
        section = LESSON[start:end]
        if section.startswith("## Going further"):
            title = section.splitlines()[0]
            assert prose_words(section) <= 800, f"{title}: {prose_words(section)} words of prose"


def test_every_checkpoint_command_checks_the_students_file():
    commands = [
        line
        for block in SHELL_BLOCK.findall(LESSON)
        for line in block.splitlines()
        if "pytest" in line
    ]
    assert commands, "lesson.md should show how to run each checkpoint"
    without = [line for line in commands if not line.startswith("LESSON_APP=my_main.py ")]
    assert not without, f"pytest commands that would check our main.py instead: {without}"


def test_every_section_has_a_checkpoint_command():
    selected = set(K_OPTION.findall(LESSON))
    for section in steps.sections(MAIN):
        name = "test_" + section.replace(".", "_")
        assert name in selected, f"lesson.md never runs the checkpoint of {section}: -k {name}"


def test_lesson_pytest_commands_select_tests():
    test_names = (HERE / "test_main.py").read_text()
    selecting_nothing = [
        expression
        for expression in K_OPTION.findall(LESSON)
        for word in expression.strip("\"'").removeprefix("not ").split(" or ")
        if f"def {word}_" not in test_names
    ]
    assert not selecting_nothing, (
        f"`pytest -k` in lesson.md that select no test: {selecting_nothing}"
    )


def test_lesson_links_point_at_headings():
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", LESSON, flags=re.M)
    }
    links = re.findall(r"\]\(#([^)]+)\)", LESSON)
    broken = [link for link in links if link not in anchors]
    assert not broken, f"lesson.md links to headings it does not have: {broken}"


def test_lesson_shows_the_core_flow_as_a_sequence_diagram():
    diagrams = re.findall(r"^```mermaid\n(.*?)^```$", LESSON, flags=re.M | re.S)
    core = LESSON[: CORE_END.search(LESSON).start()]
    assert diagrams and diagrams[0] in core, "lesson.md should show the flow as a Mermaid diagram"
    flow = diagrams[0]
    assert flow.startswith("sequenceDiagram\n")
    for step in ("/login", "Bearer", "401", "403", "is_admin"):
        assert step in flow, f"the diagram should show {step}"


def test_lesson_images_exist():
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", LESSON):
        assert (HERE / image).is_file(), f"lesson.md shows {image}, which is not in the repo"


# --- steps.py ----------------------------------------------------------------------------


def run_steps(*args):
    return subprocess.run(
        [sys.executable, "steps.py", *args], cwd=HERE, capture_output=True, text=True
    )


def test_steps_lists_the_sections_in_lesson_order():
    listed = run_steps("--list").stdout.split()
    assert listed[0] == "0"
    assert listed == sorted(listed, key=steps.order)
    assert {"1.2", "1.3", "2.1", "2.2", "3.1", "3.2", "4", "5", "6"} <= set(listed)


def test_steps_last_section_is_main_py_byte_for_byte():
    last = steps.sections(MAIN)[-1]
    assert run_steps(last).stdout == MAIN


def test_every_step_is_a_python_file():
    for section in steps.sections(MAIN):
        compile(steps.file_at(MAIN, section), f"step {section}", "exec")


def test_a_step_holds_its_section_and_no_later_one():
    file_at_2_1 = steps.file_at(MAIN, "2.1")
    assert "class CustomHTTPBearer" in file_at_2_1
    assert "def get_all_clothes" not in file_at_2_1
    assert "import jwt  # 1.2" in file_at_2_1 and "import argparse  # 5" not in file_at_2_1


def test_steps_refuses_an_unknown_section():
    result = run_steps("9.9")
    assert result.returncode != 0 and "sections: 0 1.2" in result.stderr


# --- Our other files ---------------------------------------------------------------------


def test_env_example_lists_every_setting():
    read_by_app = set(re.findall(r'config\(\s*"(\w+)"', MAIN))
    example = (HERE / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(\w+)=", example, flags=re.MULTILINE))
    assert read_by_app == listed, f"the app reads {read_by_app}, .env.example lists {listed}"


def test_swagger_groups_operations_by_lesson_section(tmp_path, monkeypatch):
    # Students spend section 2.2 in Swagger: it should read like the lesson.
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.setenv("BCRYPT_ROUNDS", "4")  # main.py times one hash at import
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'test.db'}")
    monkeypatch.syspath_prepend(HERE)
    import main

    schema = TestClient(main.app).get("/openapi.json").json()
    assert schema["info"]["title"] and schema["info"]["description"]
    operations = {
        f"{method.upper()} {path}": (operation["tags"], operation["summary"])
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
    }
