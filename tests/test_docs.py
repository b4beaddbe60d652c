"""The documentation stays a guide that can be followed: README.md is short, every repository file that README.md
and docs/*.md cite exists, and no file names documents that are not in the repository."""
import glob
import os
import re

import pytest

from helpers import REPO

README_MAX_LINES = 250
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# Where a cited path may be rooted: the repository, the package (`training/optim.py`), its parent
# (`baichuan2/data/records.py`) and example/ (commands run after `cd example`).
BASES = ("", os.path.join("research", "baichuan2"), "research", "example")
# Folders that are not part of the repository's content: environments, caches, run outputs.
SKIPPED_DIRS = {".git", ".venv", ".venv-ref", "__pycache__", ".pytest_cache", "output", "outputs", "kernel_meta",
                "demo_output", "node_modules"}
# Names that look like files of ours but are someone else's (Baichuan's own training script).
EXTERNAL_NAMES = {"fine-tune.py"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A relative path with at least one folder and a file extension of the kinds this repository holds; not part of an
# absolute path, a URL or a longer word.
PATH = re.compile(r"(?<![\w/.~$<>*-])((?:[\w.-]+/)+[\w-][\w.-]*\.(?:py|md|yaml|yml|sh|cc|h|inc|toml|txt|model))"
                  r"(?![\w/-])")
# A bare file name of ours (module, doc, recipe, script), as in `modeling_baichuan.py`.
NAME = re.compile(r"(?<![\w/.~$<>*-])([\w-]+\.(?:py|cc|md|yaml|sh))(?![\w/.-])")


def repo_files():
    """Relative paths of every file in the repository's content (SKIPPED_DIRS and *.egg-info left out)."""
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and
                   not d.startswith("rank_")]
        for name in files:
            yield os.path.relpath(os.path.join(root, name), REPO)


def read(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return f.read()


def cited_paths(text):
    """(relative link targets, path-like mentions, bare file names) cited in a markdown text."""
    links = {target.split("#")[0] for target in LINK.findall(text)
             if not re.match(r"[a-z]+:", target) and not target.startswith("#")}
    paths = set(PATH.findall(text)) - {target.split("#")[0] for target in LINK.findall(text)}
    names = set(NAME.findall(text)) - {os.path.basename(p) for p in paths}
    return links, paths, names


def missing_citations(doc, text, basenames):
    """The citations in `text` (from file `doc`) that name no file or folder of the repository."""
    links, paths, names = cited_paths(text)
    here = os.path.dirname(doc)
    missing = [f"link {t}" for t in sorted(links) if not os.path.exists(os.path.join(REPO, here, t))]
    missing += [f"path {p}" for p in sorted(paths)
                if not any(os.path.exists(os.path.normpath(os.path.join(REPO, base, p))) for base in BASES + (here,))]
    missing += [f"file {n}" for n in sorted(names) if n not in basenames and n not in EXTERNAL_NAMES]
    return missing


def test_readme_is_a_short_guide():
    lines = read("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_file_exists(doc):
    basenames = {os.path.basename(p) for p in repo_files()}
    assert missing_citations(doc, read(doc), basenames) == []


def test_citation_check_finds_a_missing_file():
    """The checks above would notice a wrong citation of each kind, and accept the right ones."""
    basenames = {os.path.basename(p) for p in repo_files()}
    text = ("See [the design](docs/DESIGN.md), [gone](docs/GONE.md), `research/baichuan2/quantization.py`, "
            "`training/optim.py`, `example/no_such_script.py`, `modeling_baichuan.py`, `no_such_module.py`, "
            "/path/to/model/config.json and https://example.com/a/b.py.")
    assert missing_citations("README.md", text, basenames) == [
        "link docs/GONE.md", "path example/no_such_script.py", "file no_such_module.py"]


def test_no_file_names_documents_outside_the_repository():
    """No file cites the weight-format document by a name it never had, or notes kept outside the repository."""
    needles = [("QUANT" + "_FORMAT").encode(), ("shared" + " facts").encode()]
    found = []
    for path in repo_files():
        with open(os.path.join(REPO, path), "rb") as f:
            data = f.read().lower()
        found += [f"{path}: {n.decode()}" for n in needles if n.lower() in data]
    assert found == []
