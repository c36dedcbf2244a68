"""Lines of code per folder of a checkout (tracked source files only; results and logs excluded).

    python tools/line_counts.py [ROOT]
"""
import subprocess
import sys
from collections import Counter
from pathlib import Path

SOURCE = (".py", ".cpp", ".cu", ".h", ".sh", ".toml", ".md")


def main(argv) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1])
    files = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    lines, count = Counter(), Counter()
    for f in files:
        if not f.endswith(SOURCE) or f.startswith("benchmarks/results/"):
            continue
        folder = str(Path(f).parent) if "/" in f else "."
        lines[folder] += len((root / f).read_text(errors="replace").splitlines())
        count[folder] += 1
    for folder in sorted(lines):
        print(f"{folder:<32} {count[folder]:>3} files {lines[folder]:>6} lines")
    print(f"{'total':<32} {sum(count.values()):>3} files {sum(lines.values()):>6} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
