"""List files over 400 lines and functions over 80 lines under autoglm_train/ (the sizes issue 26 sets).

python scripts/size_check.py [ROOT ...]    # exit 1 when something is over (make lint runs it)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def oversized(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{path}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name}(): {length} lines")
    return found


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("autoglm_train")]
    problems = [p for root in roots for p in oversized(root)]
    for p in problems:
        print("  " + p)
    print(f"{len(problems)} over the limits ({MAX_FILE_LINES} lines a file, {MAX_FUNCTION_LINES} a function)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
