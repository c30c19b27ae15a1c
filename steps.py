"""The lesson app as it stands at the end of any section of lesson.md.

    python steps.py --list           the sections, in lesson order
    python steps.py 2.1              main.py as it stands at the end of section 2.1
    python steps.py 2.1 > my_main.py     start the lesson from section 2.2

It reads main.py, where every line belongs to one lesson section:
- a banner line `# --- 2.1 Title ---` starts a block, whose lines belong to 2.1
  (0 is the app as part 3 left it);
- a line that ends in `# 3.1` belongs to 3.1, and so do the lines indented below it
  (a class body, the arguments of a call) and the bracket that closes them.
The file of a section holds the lines of that section and of every section before it.
"""

import re
import sys
from pathlib import Path


MAIN = Path(__file__).resolve().parent / "main.py"
BANNER = re.compile(r"# --- (\d+(?:\.\d+)?) (.+) ---\n")
TAG = re.compile(r"  # (\d+(?:\.\d+)?)\n")


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


def sections(text: str) -> list[str]:
    """Every section that main.py marks, in lesson order."""
    return sorted({section for section, _, _ in owned_lines(text)}, key=order)


def file_at(text: str, section: str) -> str:
    """main.py as it stands at the end of `section`."""
    kept = [line for owner, _, line in owned_lines(text) if order(owner) <= order(section)]
    return squeeze_blank_lines("".join(kept))


def squeeze_blank_lines(code: str) -> str:
    # Leaving out tagged lines can put two blank gaps together: keep at most two blank
    # lines between top-level blocks, and one inside a function.
    code = re.sub(r"\n{4,}", "\n\n\n", code)
    return re.sub(r"\n\n\n(?=[ \t])", "\n\n", code)


def additions(text: str, section: str) -> list[str]:
    """The pieces of code that `section` adds, in file order: what lesson.md shows for it.

    A piece is a run of the section's lines in the file as it stands at the end of the
    section, inside one block; the section's imports make one piece.
    """
    pieces = []
    growing = False  # does the next line of the section extend the last piece?
    blanks = ""
    for owner, title, line in owned_lines(text):
        if order(owner) > order(section):
            continue  # not written yet at the end of this section
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
    elif len(argv) == 1 and argv[0] in known:
        sys.stdout.write(file_at(text, argv[0]))
    else:
        raise SystemExit(
            f"usage: python steps.py --list | python steps.py SECTION\nsections: {' '.join(known)}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
