"""The documentation's references resolve: Markdown links and images, `docs/<file>.md#<anchor>` citations in code
and docs, and the raw benchmark results BENCHMARKS.md cites (and only those are kept)."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "BENCHMARKS.md"] + sorted(os.path.relpath(p, ROOT)
                                               for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)#([\w-]+)")
RESULT = re.compile(r"bench/results/[\w.-]+")


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _anchors(rel: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (code blocks skipped)."""
    text = re.sub(r"```.*?```", "", _read(rel), flags=re.S)
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_anchor_rule_matches_github():
    assert re.sub(r"[^\w\- ]", "", "Muon or AdamW".lower()).replace(" ", "-") == "muon-or-adamw"
    assert "fp32-parameters" in _anchors("docs/architecture.md")


@pytest.mark.parametrize("doc", DOCS)
def test_markdown_links_resolve(doc):
    text = re.sub(r"```.*?```", "", _read(doc), flags=re.S)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, rel)):
            bad.append(f"{target}: no file {rel}")
        elif anchor and rel.endswith(".md") and anchor not in _anchors(rel):
            bad.append(f"{target}: no heading #{anchor} in {rel}")
    assert not bad, f"{doc}: " + "; ".join(bad)


def _sources() -> list[str]:
    files = [os.path.relpath(p, ROOT) for d in ("dsv4", "bench", "tests")
             for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)]
    return sorted(files) + DOCS


def test_doc_citations_name_existing_sections():
    """`docs/architecture.md#compressor`-style citations (code comments, docstrings, docs) point at a heading."""
    bad = []
    for src in _sources():
        for path, anchor in CITATION.findall(_read(src)):
            rel = path if os.path.exists(os.path.join(ROOT, path)) else os.path.join("docs", path)
            if not os.path.exists(os.path.join(ROOT, rel)):
                bad.append(f"{src}: {path}#{anchor} (no such file)")
            elif anchor not in _anchors(rel):
                bad.append(f"{src}: {path}#{anchor} (no such heading)")
    assert not bad, "; ".join(bad)


def _kept_results() -> set[str]:
    """The raw results the repository holds: the tracked files of bench/results (a benchmark just run leaves an
    untracked file there until it is cited or removed), or every file where there is no git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0:
        return set(out.stdout.split())
    return {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "results", "*"))}


def test_cited_results_exist_and_every_kept_result_is_cited():
    cited = set()
    for doc in DOCS:
        cited |= {m.rstrip(".") for m in RESULT.findall(_read(doc))}
    missing = sorted(p for p in cited if not os.path.isfile(os.path.join(ROOT, p)))
    assert not missing, f"cited but not in the tree: {missing}"
    kept = _kept_results()
    benchmarks = {m.rstrip(".") for m in RESULT.findall(_read("BENCHMARKS.md"))}
    uncited = sorted(kept - benchmarks)
    assert not uncited, f"raw results no table in BENCHMARKS.md cites (remove them or cite them): {uncited}"
    named = re.compile(r"\d{4}-\d\d-\d\d_[a-z0-9-]+_([0-9a-f]{7,}|nogit)_[\w.-]+\.\w+")
    assert all(named.fullmatch(os.path.basename(p)) for p in kept), sorted(kept)
