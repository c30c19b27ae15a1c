"""The lesson app as it stands at the end of any section of lesson.md.

    python steps.py --list           the sections, in lesson order
    python steps.py 2.1              main.py as it stands at the end of section 2.1
    python steps.py 2.1 > my_main.py     start the lesson from section 2.2
    python steps.py --sizes          what the core makes a student type, against its budgets

main.py is the finished app. Every line of it belongs to one lesson section:
- a banner line `# --- 2.1 Title ---` starts a block, whose lines belong to 2.1
  (0 is the app as part 3 left it);
- a line that ends in `# 3.1` belongs to 3.1, and so do the lines indented below it
  (a class body, the arguments of a call) and the bracket that closes them.
A section may also change lines that an earlier one wrote. lesson.md shows each change
as a diff block marked with its section: its `-` lines are the earlier text, which lives
there only, and its `+` lines are main.py's. To go back from a section to the one before,
steps.py undoes that section's diffs, then drops its lines.
"""

import difflib
import functools
import re
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
MAIN = HERE / "main.py"
LESSON = HERE / "lesson.md"
BANNER = re.compile(r"# --- (\d+(?:\.\d+)?) (.+) ---\n")
TAG = re.compile(r"  # (\d+(?:\.\d+)?)\n")
# The core's prose ends where Going further, the hardening or the appendices begin.
CORE_END = re.compile(r"^## (?:Going further|Hardening|Appendix)", re.M)
DIFF_BLOCK = re.compile(r"^<!-- section (\S+) -->\n```diff\n(.*?)^```$", re.M | re.S)

# The core is what one 90-minute class teaches: sections 1.2 to 5, on part 3's app.
CORE = ["0", "1.2", "1.3", "2.1", "2.2", "3.1", "3.2", "4", "5"]
BUDGETS = {
    "step 0 lines": 130,  # handed out, not typed
    "lines per section": 40,  # what one section adds or changes
    "1.3 lines": 25,
    "core lines": 160,  # 1.2 to 5 together
    "core characters": 6000,
    "core words": 2200,  # lesson.md's prose, up to the first section after 5
}


def order(section: str) -> tuple[int, ...]:
    """'2.1' -> (2, 1), so that '10' comes after '9' and '1.3' before '2'."""
    return tuple(int(part) for part in section.split("."))


def owned_lines(text: str) -> list[tuple[str, str, str]]:
    """(section, block title, line) for every line of main.py."""
    owned = []
    block_section, block_title = "0", ""
    tag_section, tag_indent = None, 0
    for line in text.splitlines(keepends=True):
        indent = len(line) - len(line.lstrip())
        if tag_section and line.strip():
            closes = indent == tag_indent and line.lstrip()[0] in ")]}"
            if indent <= tag_indent and not closes:
                tag_section = None
        banner = BANNER.fullmatch(line)
        tag = TAG.search(line)
        if banner:
            block_section, block_title = banner[1], banner[2]
        elif tag and not tag_section:
            tag_section, tag_indent = tag[1], indent
        # Blank lines stay with the block: removing a tagged part leaves the spacing around it.
        section = tag_section if tag_section and line.strip() else block_section
        owned.append((section, block_title, line))
    return owned


def lesson_diffs(lesson: str) -> dict[str, list[tuple[str, str]]]:
    """{section: [(old text, new text), ...]} from lesson.md's diff blocks, in lesson order."""
    diffs = {}
    for section, body in DIFF_BLOCK.findall(lesson):
        old, new = [], []
        for line in body.splitlines():
            mark, code = (line[0], line[1:]) if line else (" ", "")
            if mark not in " -+":
                raise ValueError(f"a diff line of {section} must start with ' ', '-' or '+'")
            if mark != "+":
                old.append(code + "\n")
            if mark != "-":
                new.append(code + "\n")
        diffs.setdefault(section, []).append(("".join(old), "".join(new)))
    return diffs


def sections(text: str, lesson: str | None = None) -> list[str]:
    """Every section that main.py marks or lesson.md changes, in lesson order."""
    lesson = LESSON.read_text() if lesson is None else lesson
    found = {section for section, _, _ in owned_lines(text)} | set(lesson_diffs(lesson))
    return sorted(found, key=order)


def keep_up_to(text: str, section: str) -> str:
    kept = [line for owner, _, line in owned_lines(text) if order(owner) <= order(section)]
    return squeeze_blank_lines("".join(kept))


def undo(text: str, old: str, new: str, section: str) -> str:
    """Put a diff's old lines back in place of its new ones, which must stand there once."""
    found = ("\n" + text).count("\n" + new)
    if found != 1:
        first = new.strip().splitlines()[0] if new.strip() else "(empty)"
        raise ValueError(
            f"lesson.md's diff of {section} starting {first!r} is in the file {found} times, "
            "not once"
        )
    return ("\n" + text).replace("\n" + new, "\n" + old, 1)[1:]


def file_at(text: str, section: str, lesson: str | None = None) -> str:
    """main.py as it stands at the end of `section`."""
    return step_of(text, section, LESSON.read_text() if lesson is None else lesson)


@functools.cache  # the tests ask for each step many times: it is worked out once
def step_of(text: str, section: str, lesson: str) -> str:
    diffs = lesson_diffs(lesson)
    for later in reversed(sections(text, lesson)):
        if order(later) <= order(section):
            break
        text = keep_up_to(text, later)
        for old, new in reversed(diffs.get(later, [])):
            text = undo(text, old, new, later)
    return keep_up_to(text, section)


def squeeze_blank_lines(code: str) -> str:
    # Leaving out tagged lines can put two blank gaps together: keep at most two blank
    # lines between top-level blocks, and one inside a function.
    code = re.sub(r"\n{4,}", "\n\n\n", code)
    return re.sub(r"\n\n\n(?=[ \t])", "\n\n", code)


def additions(text: str, section: str, lesson: str | None = None) -> list[str]:
    """The pieces of code that `section` adds, in file order: lesson.md's python blocks for it.

    A piece is a run of the section's lines in the file as it stands at the end of the
    section, inside one block; the section's imports make one piece. What a section
    changes in earlier lines is not here: lesson.md shows it as a diff.
    """
    pieces = []
    growing = False  # does the next line of the section extend the last piece?
    blanks = ""
    for owner, title, line in owned_lines(file_at(text, section, lesson)):
        if not line.strip():
            blanks += line
            continue
        if owner == section:
            if growing and not BANNER.fullmatch(line):
                pieces[-1] += blanks + line
            else:
                pieces.append(line)
            growing = True
        elif title != "Imports":
            growing = False
        blanks = ""
    return [squeeze_blank_lines(piece) for piece in pieces]


def changed_lines(before: str, after: str) -> list[str]:
    """The non-blank lines that `after` adds or changes, as `diff` shows them with a +."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    return [line[1:] for line in added if line[1:].strip()]


def prose_words(markdown: str) -> int:
    without_code = re.sub(r"^```.*?^```$", "", markdown, flags=re.M | re.S)
    return len(without_code.split())


def core_sizes(text: str, lesson: str | None = None) -> dict[str, int]:
    """What the core makes a student type and read, by the measures of BUDGETS."""
    lesson = LESSON.read_text() if lesson is None else lesson
    files = {section: file_at(text, section, lesson) for section in CORE}
    sizes = {"step 0 lines": sum(1 for line in files["0"].splitlines() if line.strip())}
    typed = []
    for before, section in zip(CORE, CORE[1:], strict=False):
        lines = changed_lines(files[before], files[section])
        sizes[f"{section} lines"] = len(lines)
        typed += lines
    sizes["core lines"] = len(typed)
    # Characters typed, not counting the indentation an editor makes.
    sizes["core characters"] = sum(len(line.strip()) for line in typed)
    core_prose = CORE_END.split(lesson)[0]
    sizes["core words"] = prose_words(core_prose)
    return sizes


def budget_of(name: str) -> int:
    """The budget of one of core_sizes' measures: a section's lines have the common one."""
    return BUDGETS.get(name, BUDGETS["lines per section"])


def over_budget(sizes: dict[str, int]) -> list[str]:
    """One line for every size past its budget."""
    return [
        f"{name}: {size}, budget {budget_of(name)}"
        for name, size in sizes.items()
        if size > budget_of(name)
    ]


# A top-level line that defines or imports a name: def, class, import or assignment.
DEFINITION = re.compile(r"(?:async def |def |class |import |from \S+ import )?(\w+)")


def introduced_in(text: str, name: str) -> str | None:
    """The section that defines or imports `name` at the top level of main.py, if any."""
    for section, _, line in owned_lines(text):
        match = DEFINITION.match(line)
        if match and match[1] == name:
            return section
    return None


def main(argv: list[str]) -> None:
    text = MAIN.read_text()
    known = sections(text)
    if argv == ["--list"]:
        print("\n".join(known))
    elif argv == ["--sizes"]:
        sizes = core_sizes(text)
        for name, size in sizes.items():
            print(f"{name:>16}: {size:5}  (budget {budget_of(name)})")
        over = over_budget(sizes)
        print("over budget: " + "; ".join(over) if over else "every size is within its budget")
        raise SystemExit(1 if over else 0)
    elif len(argv) == 1 and argv[0] in known:
        sys.stdout.write(file_at(text, argv[0]))
    else:
        raise SystemExit(
            f"usage: python steps.py --list | --sizes | SECTION\nsections: {' '.join(known)}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
