"""What a newcomer reads is in the repository: every file README.md and docs/*.md point at exists, and every
`docs/design.md §N` cited anywhere names a section that document has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path as the docs write one: in backticks or a markdown link, ending in a file type the repository holds
PATH = re.compile(r"(?:`|\]\()(\.{0,2}/?[\w./-]+\.(?:md|py|proto|sh|yaml|yml|json|toml|c|h))(?:[`):#\s])")
# files a user or a run makes (figures.json: deploy/gpu/device-check.sh's output), named without a folder
MADE_ELSEWHERE = ("registry.sqlite3", "adapter_config.json", "adapter_model.safetensors", "head_config.json",
                  "config.json", "tokenizer.json", "hotlora_training.json", "train.jsonl", "qa.jsonl",
                  "test.jsonl", "secret-tokens.yaml", "README.md",
                  "figures.json")  # fmt: skip


def _repository_files() -> list[str]:
    """Every file of the repository (tracked or new), relative to its root."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [f for f in out.split() if (ROOT / f).is_file()]


def test_every_file_the_docs_point_at_exists():
    files = _repository_files()
    missing = []
    for doc in DOCS:
        for ref in PATH.findall(doc.read_text()):
            if Path(ref).name in MADE_ELSEWHERE and "/" not in ref.strip("./"):
                continue  # a file of the user's (an adapter's, a data dir's), not of this repository
            as_written = (doc.parent / ref).resolve()
            if as_written.is_relative_to(ROOT) and str(as_written.relative_to(ROOT)) in files:
                continue
            tail = ref.lstrip("./")
            if not any(f == tail or f.endswith("/" + tail) for f in files):  # a name within its folder's text
                missing.append(f"{doc.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)


def test_design_sections_cited_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, re.M))
    figures = set(re.findall(r"^(\d+)\. ", design.split("## 6.")[1].split("## 7.")[0], re.M))
    for path in _repository_files():
        if not path.endswith((".py", ".md")) or path == "tests/test_docs.py":
            continue
        text = (ROOT / path).read_text()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md, which is not in the repository"
        for section, figure in re.findall(r"docs/design\.md`? §(\d+)(?:, figures? (\d+))?", text):
            assert section in sections, f"{path}: docs/design.md §{section}"
            assert not figure or figure in figures, f"{path}: docs/design.md §{section}, figure {figure}"
