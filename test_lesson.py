"""lesson.md, steps.py and our own files agree with main.py.

These check the project, not a student's file, so they always read our main.py.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from passlib.context import CryptContext

import conftest
import steps


HERE = Path(__file__).resolve().parent
MAIN = (HERE / "main.py").read_text()
LESSON = (HERE / "lesson.md").read_text()
# <!-- section 1.2 --> right above the python block it marks.
MARKED_BLOCK = re.compile(r"^<!-- section (\S+) -->\n```python\n(.*?)^```$", re.M | re.S)
PYTHON_BLOCK = re.compile(r"^```python\n", re.M)
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.M | re.S)
K_OPTION = re.compile(r"pytest -k (\"[^\"]+\"|'[^']+'|\w+)")
CORE = LESSON[: steps.CORE_END.search(LESSON).start()]
SECTIONS = steps.sections(MAIN)

pytestmark = pytest.mark.filterwarnings("error")


def top_sections(prefix: str) -> list[str]:
    """The text of every `## ` section of lesson.md whose heading starts with prefix."""
    starts = [match.start() for match in re.finditer(r"^## ", LESSON, flags=re.M)]
    texts = [LESSON[a:b] for a, b in zip(starts, starts[1:] + [len(LESSON)], strict=True)]
    return [text for text in texts if text.startswith("## " + prefix)]


def test_lesson_shows_what_each_section_adds():
    shown = {}
    for section, code in MARKED_BLOCK.findall(LESSON):
        shown.setdefault(section, []).append(code)
    for section in SECTIONS:
        assert shown.pop(section, []) == steps.additions(MAIN, section), (
            f"lesson.md's blocks for {section} differ from what {section} adds to main.py "
            f"(python steps.py {section} shows the file)"
        )
    assert not shown, f"lesson.md marks sections main.py does not have: {sorted(shown)}"


def test_each_diff_changes_the_step_before_into_its_own():
    # A diff's + lines (and context) are its section's file; its - lines the step before's.
    diffs = steps.lesson_diffs(LESSON)
    assert diffs, "lesson.md should show what later sections change as diff blocks"
    for section, changes in diffs.items():
        assert section in SECTIONS, f"lesson.md has a diff for {section}, which main.py lacks"
        before = SECTIONS[SECTIONS.index(section) - 1]
        after_file, before_file = steps.file_at(MAIN, section), steps.file_at(MAIN, before)
        for old, new in changes:
            first = new.splitlines()[0] if new else old.splitlines()[0]
            assert ("\n" + after_file).count("\n" + new) == 1, (
                f"the + side of {section}'s diff starting {first!r} is not in step {section}"
            )
            assert ("\n" + before_file).count("\n" + old) == 1, (
                f"the - side of {section}'s diff starting {first!r} is not in step {before}"
            )


def test_every_python_block_of_the_core_is_marked():
    unmarked = len(PYTHON_BLOCK.findall(CORE)) - len(MARKED_BLOCK.findall(CORE))
    assert unmarked == 0, f"{unmarked} python blocks in the core are not marked with a section"


def test_the_core_fits_one_class():
    # The budgets of one 90-minute class: `python steps.py --sizes` prints every size.
    over = steps.over_budget(steps.core_sizes(MAIN, LESSON))
    assert not over, f"the core is over budget (python steps.py --sizes): {over}"


def test_the_whole_lesson_is_within_8000_words():
    words = steps.prose_words(LESSON)
    assert words <= 8000, f"the lesson has {words} words of prose"


def test_each_section_after_the_core_is_short():
    # Each is taught on its own, after the core: at most 800 words of prose.
    for section in top_sections("Going further") + top_sections("Hardening"):
        words = steps.prose_words(section)
        assert words <= 800, f"{section.splitlines()[0]}: {words} words of prose"


def test_each_hardening_section_opens_with_its_attack():
    hardening = top_sections("Hardening")
    assert len(hardening) >= 2
    for section in hardening:
        title = section.splitlines()[0]
        number = title.split()[2]
        attack = re.search(r"^```(sh|python)\n", section, flags=re.M)
        fix = re.search(rf"^<!-- section {re.escape(number)} -->", section, flags=re.M)
        assert attack and fix and attack.start() < fix.start(), (
            f"{title}: show the attack (a sh or python block) before the fix"
        )
        assert re.search(r"\*\*The (attack|fault) again", section), f"{title}: run it again"


def test_the_core_ends_with_what_it_still_lacks():
    # "Before you ship": one line for every section after the core, linking it.
    ship = CORE[CORE.index("## Before you ship") :]
    later = [s for s in SECTIONS if steps.order(s) > (5,)]
    for section in later:
        assert re.search(rf"\]\(#[a-z-]*-{section}-[a-z0-9-]+\)", ship), (
            f"Before you ship should link section {section}"
        )


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
    for section in SECTIONS:
        name = "test_" + section.replace(".", "_")
        assert name in selected, f"lesson.md never runs the checkpoint of {section}: -k {name}"


def test_lesson_pytest_commands_select_tests():
    test_names = (HERE / "test_main.py").read_text()
    selecting_nothing = [
        expression
        for expression in K_OPTION.findall(LESSON)
        for word in expression.strip("\"'").removeprefix("not ").split(" or ")
        # "test_1_" picks 1.2 and 1.3 but not 10 to 14; "test_1" would pick them all.
        if f"def {word.removesuffix('_')}_" not in test_names
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
    assert diagrams and diagrams[0] in CORE, "lesson.md should show the flow as a Mermaid diagram"
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
    assert steps.CORE == listed[: len(steps.CORE)]
    # Going further 6 to 8, then at least two hardening sections.
    after = [section for section in listed if steps.order(section) > (8,)]
    assert listed[len(steps.CORE) : len(steps.CORE) + 3] == ["6", "7", "8"] and len(after) >= 2


def test_steps_sizes_prints_the_core_against_its_budgets():
    result = run_steps("--sizes")
    assert result.returncode == 0, result.stdout
    assert "core lines" in result.stdout and "every size is within its budget" in result.stdout


def test_steps_last_section_is_main_py_byte_for_byte():
    last = steps.sections(MAIN)[-1]
    assert run_steps(last).stdout == MAIN


def test_every_step_is_a_python_file():
    for section in SECTIONS:
        compile(steps.file_at(MAIN, section), f"step {section}", "exec")


def test_a_step_holds_its_section_and_no_later_one():
    file_at_2_1 = steps.file_at(MAIN, "2.1")
    assert "class CustomHTTPBearer" in file_at_2_1
    assert "def get_all_clothes" not in file_at_2_1
    assert "import jwt  # 1.2" in file_at_2_1 and "import argparse  # 5" not in file_at_2_1


def test_a_step_before_a_change_holds_the_old_lines():
    # 12 replaces run_in_threadpool with run_hashing: lesson.md's diff keeps the old lines.
    hashed_before = "await run_in_threadpool(pwd_context.hash, user.password)"
    hashed_after = "await run_hashing(request, pwd_context.hash, user.password)"
    assert hashed_before in steps.file_at(MAIN, "11")
    assert hashed_after in steps.file_at(MAIN, "12") and hashed_before not in MAIN


def test_steps_refuses_an_unknown_section():
    result = run_steps("9.9")
    assert result.returncode != 0 and "sections: 0 1.2" in result.stderr


# --- Our other files ---------------------------------------------------------------------


def test_env_example_lists_every_setting():
    read_by_app = set(re.findall(r'(?:config|number_setting)\(\s*"(\w+)"', MAIN))
    example = (HERE / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(\w+)=", example, flags=re.MULTILINE))
    assert read_by_app == listed, f"the app reads {read_by_app}, .env.example lists {listed}"


def test_swapped_verify_arguments_are_traced_to_section_4():
    # The hash where the typed password goes: passlib cannot tell what kind of hash it is.
    context = CryptContext(schemes=["bcrypt"], bcrypt__rounds=4)
    with pytest.raises(ValueError) as error:
        context.verify(context.hash("correct horse"), "correct horse")
    explained = conftest.describe(error.value, [])
    assert explained.startswith("4: pwd_context.verify takes the typed password first"), explained
