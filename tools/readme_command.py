"""Print one of the README's two top commands, so CI runs exactly what a newcomer reads.

    python tools/readme_command.py test    # the bash block under "Run the tests"
    python tools/readme_command.py main    # the bash block under "Run the main job"
"""
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADINGS = {"main": "**Run the main job**", "test": "**Run the tests**"}


def command(which: str, text: str | None = None) -> str:
    """The first bash block after the README paragraph that starts with HEADINGS[which]."""
    text = README.read_text() if text is None else text
    start = text.find(HEADINGS[which])
    if start < 0:
        raise SystemExit(f"README.md has no paragraph starting with {HEADINGS[which]!r}")
    block = re.search(r"```bash\n(.*?)```", text[start:], flags=re.S)
    if block is None:
        raise SystemExit(f"README.md has no bash block after {HEADINGS[which]!r}")
    return block.group(1).strip()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in HEADINGS:
        raise SystemExit(f"usage: python tools/readme_command.py {'|'.join(HEADINGS)}")
    print(command(sys.argv[1]))
