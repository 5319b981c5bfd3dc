"""Copy a finished ``make demo-all`` report into benchmarks/RESULTS.md, so every README figure has its entry.

    python benchmarks/demo_results.py [--root outputs/demo]

The pipeline's report (``<root>/report/report.md``) already reads every number from the runs' own files and
names each source; this copies its tables and notes (not its plots) under "Default pipeline: make demo-all",
with the CPU the run was made on.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section


def section_body(report: str) -> str:
    """The report without its title and images, its headings one level down (they sit under a RESULTS section)."""
    lines = []
    for line in report.splitlines():
        if line.startswith("# ") or line.startswith("!["):
            continue
        lines.append(re.sub(r"^(#{2,5}) ", lambda m: "#" + m.group(1) + " ", line))
    return "\n".join(lines).strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="outputs/demo", help="the pipeline's output folder")
    args = p.parse_args()
    report = Path(args.root) / "report" / "report.md"
    if not report.is_file():
        print(f"error: {report} not found: run `make demo-all` first", file=sys.stderr)
        return 2
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    body = f"From `{report}` (CPU capability {capability}).\n\n{section_body(report.read_text())}"
    write_section("Default pipeline: make demo-all", body, script="demo_results.py (make demo-all's report)")
    print(f"wrote the 'Default pipeline: make demo-all' section of benchmarks/RESULTS.md from {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
