"""What users read: the README's length and order, links that resolve, and words about how the project was made."""

import re

import pytest
from conftest import REPO

# Words that speak of how the project was developed rather than of the project. An issue of the challenge's
# repository is named with its number ("parameter-golf issue #1017"), which the pattern allows.
LEAKS = {
    "a development workspace path": r"\.\./shared\b|\bshared/corpus\b|\bshared corpus\b",
    "a work session": r"\bsessions?\b",
    "an issue of ours": r"\bissues?\b(?! #\d)",
    "a ticket": r"\btickets?\b",
    "a note to the team": r"\bclosing note\b|\bthe team\b|\bDEVELOPERS\.md\b",
    "a lent machine": r"\blent\b|\bdevice tool\b|\bdevice time\b",
    "a work stop": r"\bstop \d+\b",
    "a reminder": r"\bTODO\b|\bFIXME\b",
}

# What users read: docs, help texts and comments of every file they run, log lines (written by train_gpt.py).
READ_BY_USERS = ["README.md", "docs/*.md", "records/README.md", "records/*/README.md", "train_gpt.py",
                 "benchmarks/*.py", "data/*.py", "records/*.py", "requirements*.txt", ".ci/run"]


def leaks(text):
    """[(kind, the line)] of every development word in `text`."""
    return [(kind, line.strip()) for line in text.splitlines() for kind, pattern in LEAKS.items()
            if re.search(pattern, line, re.I)]


@pytest.mark.parametrize("planted", ["see ../shared/corpus/x", "this session measured", "(issue: the CUDA path)",
                                     "the issues say", "ticket 4", "as the team decided", "on the lent GPU",
                                     "until stop 38", "TODO: later", "read DEVELOPERS.md"])
def test_a_planted_development_word_is_found(planted):
    assert leaks(f"a clean line\n{planted}\nparameter-golf issue #1017 is the challenge's") != []
    assert leaks("a clean line\nparameter-golf issue #1017 is the challenge's") == []


def test_what_users_read_speaks_only_of_the_project():
    files = sorted({path for pattern in READ_BY_USERS for path in REPO.glob(pattern)})
    assert len(files) > 20
    found = [(path.relative_to(REPO), kind, line) for path in files for kind, line in leaks(path.read_text())]
    assert found == [], "\n".join(f"{path}: {kind}: {line}" for path, kind, line in found)


def github_anchor(heading):
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_of_the_readme_and_docs_resolves_to_a_file_and_heading():
    documents = [REPO / "README.md", REPO / "records" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for document in documents:
        for target in re.findall(r"\]\(\s*([^)\s]+)\s*\)", document.read_text()):
            if re.match(r"https?://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists():
                broken.append(f"{document.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)
                if anchor not in {github_anchor(heading) for heading in headings}:
                    broken.append(f"{document.name}: {target} (no such heading)")
    assert broken == []


def test_every_doc_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [doc.name for doc in sorted((REPO / "docs").glob("*.md")) if f"(docs/{doc.name})" not in readme] == []


def test_the_readme_is_short_and_in_the_order_a_record_chaser_needs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 25_000
    sections = re.findall(r"^## (.*)$", readme, re.M)
    assert sections[:6] == ["Quick start", "A record run", "GPU figures", "An ablation at full size",
                            "From finished runs to a pull request", "Troubleshooting"]


def test_the_scripts_and_docs_users_read_keep_their_lines_within_120_characters():
    # A Markdown table row cannot be wrapped; a records folder's README is written by records/make.py
    read = ["train_gpt.py", "benchmarks/*.py", "data/*.py", "records/*.py", "tests/*.py", "README.md", "docs/*.md",
            "records/README.md"]
    long_lines = [f"{path.relative_to(REPO)}:{number} ({len(line)})" for pattern in read
                  for path in sorted(REPO.glob(pattern))
                  for number, line in enumerate(path.read_text().splitlines(), 1)
                  if len(line) > 120 and not (path.suffix == ".md" and line.startswith("|"))]
    assert long_lines == []


def logged_keys(source):
    """The keys of the log lines the script writes: `log(f"key:...")`, `log(f"key ...")` and `log(f"key=...")`."""
    return set(re.findall(r'\blog\(\s*f?"([a-z_]+)[:= ]', source))


def test_every_line_the_log_can_hold_is_in_the_log_table():
    table = [row for row in (REPO / "docs" / "runs.md").read_text().splitlines() if row.startswith("| `")]
    documented = {key for row in table for key in re.findall(r"`([a-z_]+)[:= ]", row.split(" | ")[0])}
    keys = logged_keys((REPO / "train_gpt.py").read_text())
    assert len(keys) > 40 and keys <= documented, sorted(keys - documented)
    assert logged_keys('run.log(f"brand_new: x")\nlog("other=1")') == {"brand_new", "other"}
