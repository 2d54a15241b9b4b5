"""benchmarks/RESULTS.md: each benchmark script owns one `## Title` section and rewrites only that one.

Imported by the scripts beside it (`from results_file import write_section`), as they import each other.
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(title: str, section: str) -> None:
    """Replace the `## {title}` section of RESULTS.md with `section` (or append it)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = section.rstrip("\n") + "\n\n"  # a blank line before the next section's heading
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")


def write_lines(title: str, lines: list[str]) -> None:
    """Write `lines` as the body of the `## {title}` section, a blank line before the next section."""
    write_section(title, f"## {title}\n\n" + "\n".join(lines) + "\n\n")
