"""Walk the lesson step by step, as a student does, and check the checkpoint contract.

    python .ci/walk_lesson.py      (from the repo root, in a venv with requirements.txt)

For every section S that `python steps.py --list` prints, it writes `python steps.py S`
to my_main.py in a fresh temporary folder and runs the checkpoints on it, once:
- the file passes every checkpoint of S and of the sections before it;
- the file fails the checkpoint of the next section (else that section teaches nothing);
- every section has a checkpoint, and the last step is main.py byte for byte.
One line per check, then "N passed, M failed"; exit 1 if any failed. SQLite only.
"""

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds for any one command: a hung step fails, it does not hang CI
SHOWN_FAILURES = 5
results = []


def report(name, ok, seen):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {seen}", flush=True)


def steps_py(*args):
    """The output of `python steps.py ...`, as bytes, so that no newline gets translated.

    We run steps.py as a student does rather than import it: that checks its command line too.
    """
    command = [sys.executable, "steps.py", *args]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=TIMEOUT, check=True)
    return run.stdout


def prefix(section):
    """The start of a test name for a section: "1.2" -> "test_1_2_", "4" -> "test_4_"."""
    return f"test_{section.replace('.', '_')}_"


def steps_order(section):
    """'2.1' -> (2, 1), as steps.py orders sections, so that '10' comes after '9'."""
    return tuple(int(part) for part in section.split("."))


def section_of(test_name, sections):
    """The section a test checks: the longest prefix that matches, so 1.2 wins over 1."""
    matching = [s for s in sections if test_name.startswith(prefix(s))]
    return max(matching, key=len, default=None)


def read_junit(path):
    """{test name: (outcome, message)}, outcome "passed", "failed" or "skipped"."""
    outcomes = {}
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
                break  # a failure is what counts, even if the teardown also erred
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        outcomes[case.get("name")] = (outcome, message)
    return outcomes


def run_checkpoints(app_file, selected, folder):
    """Run the checkpoints of `selected` sections on app_file: (outcomes, problem, seconds)."""
    junit = folder / "junit.xml"
    log = folder / "pytest.log"
    command = [sys.executable, "-m", "pytest", "-W", "error", "-p", "no:cacheprovider", "-q"]
    command += [f"--junitxml={junit}", "-k", " or ".join(prefix(s) for s in selected)]
    # SQLite only, and LESSON_APP for this run only, never in our own environment.
    env = {k: v for k, v in os.environ.items() if k != "TEST_DATABASE_URL"}
    env["LESSON_APP"] = str(app_file)
    start = time.monotonic()
    # Output goes to a file, not a pipe: after a timeout, a leftover child holding the pipe
    # open would keep us waiting.
    with open(log, "w") as output:
        try:
            run = subprocess.run(
                command, cwd=ROOT, env=env, stdout=output, stderr=output, timeout=TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return {}, f"pytest timed out after {TIMEOUT} s", time.monotonic() - start
    seconds = time.monotonic() - start
    # 0: all passed, 1: some failed, 5: none selected. Anything else is a broken run.
    if run.returncode not in (0, 1, 5) or not junit.exists():
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        return {}, f"pytest exited with {run.returncode}: {last}", seconds
    return read_junit(junit), None, seconds


def check_step(section, next_section, sections, tests_seen):
    """Write the student's file of `section`, run its checkpoints and the next one's.

    Returns the file, so that main can compare the last one with main.py.
    """
    with tempfile.TemporaryDirectory(prefix=f"walk-{section}-") as name:
        folder = Path(name)
        app_file = folder / "my_main.py"
        try:
            content = steps_py(section)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            report(f"step {section} is written by steps.py", False, str(error))
            return b""
        app_file.write_bytes(content)
        upto = [s for s in sections if steps_order(s) <= steps_order(section)]
        selected = upto + ([next_section] if next_section else [])
        outcomes, problem, seconds = run_checkpoints(app_file, selected, folder)

    if problem:
        report(f"step {section} runs its checkpoints", False, f"{problem} ({seconds:.1f} s)")
        return content
    by_section = {name: section_of(name, sections) for name in outcomes}
    for name, owner in by_section.items():
        tests_seen.setdefault(owner, set()).add(name)

    mine = [name for name, owner in by_section.items() if owner in upto]
    # A skipped checkpoint checked nothing: only "passed" counts.
    failed = [name for name in mine if outcomes[name][0] != "passed"]
    seen = f"{len(mine) - len(failed)} of {len(mine)} passed, run took {seconds:.1f} s"
    report(f"step {section} passes checkpoints up to {section}", not failed, seen)
    for name in failed[:SHOWN_FAILURES]:
        outcome, message = outcomes[name]
        print(f"    {name} {outcome}: {message.splitlines()[0] if message else ''}"[:200])
    if len(failed) > SHOWN_FAILURES:
        print(f"    ... and {len(failed) - SHOWN_FAILURES} more")

    if next_section:
        theirs = [name for name, owner in by_section.items() if owner == next_section]
        failing = sum(outcomes[name][0] == "failed" for name in theirs)
        # The file of the section before NEXT must still need NEXT's work.
        report(
            f"step {section} fails checkpoint {next_section}",
            failing > 0,
            f"{failing} of {len(theirs)} failed",
        )
    return content


def main():
    sections = steps_py("--list").decode().split()
    tests_seen = {}  # section -> names of its tests, from every run's JUnit XML
    walk_start = time.monotonic()
    content = b""
    for index, section in enumerate(sections):
        next_section = sections[index + 1] if index + 1 < len(sections) else None
        content = check_step(section, next_section, sections, tests_seen)
    walk_seconds = time.monotonic() - walk_start

    counts = [f"{s} ({len(tests_seen.get(s, ()))})" for s in sections]
    missing = [s for s in sections if not tests_seen.get(s)]
    seen = f"no test for {', '.join(missing)}" if missing else ", ".join(counts)
    report("every section has a checkpoint", not missing, seen)

    main_py = (ROOT / "main.py").read_bytes()
    same = content == main_py
    seen = "identical" if same else f"{len(content)} bytes, main.py has {len(main_py)}"
    report(f"the last step, {sections[-1]}, is main.py byte for byte", same, seen)

    print(f"walked {len(sections)} steps in {walk_seconds:.1f} s")
    print(f"{results.count(True)} passed, {results.count(False)} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
