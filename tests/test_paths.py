"""Every repository path the docs, flag files and code comments name exists; no "session" in the docs.

A reader follows `mid_tf/kernels/xla.py` or `docs/method.md` from a README line, a flag's help text or a
docstring; a path that moved without its mentions being updated sends them nowhere. The scan is static
(no imports): it reads README.md, docs/**/*.md, configs/*.flags and the top-level text files that name
paths (requirements*.txt, pyproject.toml, pytest.ini, .ci/run) whole, and the comments and string literals
(docstrings, flag help, messages) of mid_tf/**/*.py, train.py, export.py, benchmarks/*.py and tests/*.py.

A candidate is a token that starts with a repository room (`mid_tf/`, `docs/`, `configs/`, `tests/`,
`benchmarks/`, `deploy/`) or is a top-level file (README.md, LICENSE, pyproject.toml, requirements*.txt).
Tokens glued to a preceding `/`, `.`, `$` or word character are parts of other paths (`../shared/...`,
`/tmp/docs/...`, `$OUT/...`, URLs) and are not candidates. Placeholders (`<model_dir>`) and globs
(`configs/mnist*.flags`, `grid_{a,b}.png`) are skipped. A bare file name (`meta.py`, `method.md`,
`mnist.flags`) must name some file of the repository, which catches notes that were never committed
(`mid-method.md`) and modules that moved away. Markdown links are also resolved relative to the page
that holds them, as a browser would.
"""
from __future__ import annotations

import io
import pathlib
import re
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

ROOMS = ("mid_tf", "docs", "configs", "tests", "benchmarks", "deploy")
TOP_LEVEL = r"README\.md|LICENSE|pyproject\.toml|requirements[\w-]*\.txt"
# A token may hold placeholder and glob characters so that they can be recognised and skipped.
_TOKEN = r"[\w./<>*?{},~-]*"
PATH_RE = re.compile(
    r"(?<![\w./$~<{-])"
    rf"((?:{'|'.join(ROOMS)})/{_TOKEN}|(?:{TOP_LEVEL})(?![\w-]))")
MD_LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
BARE_RE = re.compile(r"(?<![\w./$~<{-])([\w-]+\.(?:py|md|flags))(?![\w-])")
# Files of the official MID code (github.com/mln66/MID and its timing harness beside the repository),
# which the benchmarks cite on purpose: they are outside this repository by design.
OUTSIDE = {"meta_defense_MNIST_cls_simi_cyc.py", "train_timing.py"}
TRAILING = ".,;:!?)'\"`"


def _clean(token: str) -> str | None:
    """The path a token names, or None for placeholders and globs."""
    token = token.rstrip(TRAILING)
    if any(c in token for c in "<>*?{}"):
        return None
    if "," in token:  # `a/b.py,c` in a comma list: the path ends at the comma
        token = token.split(",", 1)[0].rstrip(TRAILING)
    return token or None


def paths_in(text: str) -> set[str]:
    found = set()
    for match in PATH_RE.finditer(text):
        path = _clean(match.group(1))
        if path:
            found.add(path)
    return found


def _python_prose(path: pathlib.Path) -> str:
    """Comments and string literals (docstrings, flag help, messages) of a Python file."""
    pieces = []
    with io.open(path, encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                pieces.append(tok.string)
            elif getattr(tokenize, "FSTRING_MIDDLE", None) == tok.type:
                pieces.append(tok.string)
    return "\n".join(pieces)


def _doc_files() -> list[pathlib.Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _code_files() -> list[pathlib.Path]:
    files = [REPO / "train.py", REPO / "export.py", *sorted((REPO / "mid_tf").rglob("*.py")),
             *sorted((REPO / "benchmarks").glob("*.py")),
             *sorted(f for f in (REPO / "tests").glob("*.py") if f.name != pathlib.Path(__file__).name)]
    return [f for f in files if f.is_file()]


def _text_files() -> list[pathlib.Path]:
    files = [*sorted((REPO / "configs").glob("*.flags")), *sorted(REPO.glob("requirements*.txt")),
             REPO / "pyproject.toml", REPO / "pytest.ini", REPO / ".ci" / "run"]
    return [f for f in files if f.is_file()]


def sources() -> list[pathlib.Path]:
    return [f for f in _doc_files() if f.is_file()] + _text_files() + _code_files()


def scanned_text(path: pathlib.Path) -> str:
    return _python_prose(path) if path.suffix == ".py" else path.read_text(encoding="utf-8")


def _exists(path: str) -> bool:
    return (REPO / path).exists()


def _repo_file_names() -> set[str]:
    """Names of the top-level files and of every file in the rooms (not runs/, exports/ or venvs)."""
    names = {p.name for p in REPO.iterdir() if p.is_file()}
    for room in ROOMS:
        names.update(p.name for p in (REPO / room).rglob("*") if "__pycache__" not in p.parts)
    return names


_NAMES = _repo_file_names()


def bare_names_in(text: str) -> set[str]:
    return set(BARE_RE.findall(text)) - OUTSIDE


def _missing(text: str) -> list[str]:
    missing = {p for p in paths_in(text) if not _exists(p)}
    missing |= {n for n in bare_names_in(text) if n not in _NAMES}
    return sorted(missing)


def test_candidate_detection():
    text = ("see `mid_tf/kernels/xla.py`, docs/method.md. and (configs/mnist.flags); README.md, "
            "`<model_dir>/eval/`, configs/mnist*.flags, grid_{a,b}.png, ../shared/tools/x, /tmp/docs/a, "
            "$OUT/docs/b, https://example.org/docs/c.md, runs/mnist, mid_tf/<x>.py, "
            "requirements-test.txt, mid_tf/training/meta.py:42, README.mdx")
    assert paths_in(text) == {"mid_tf/kernels/xla.py", "docs/method.md", "configs/mnist.flags",
                              "README.md", "requirements-test.txt", "mid_tf/training/meta.py"}
    assert _missing("`mid_tf/models/xla_kernels.py` and docs/architecture") == [
        "docs/architecture", "mid_tf/models/xla_kernels.py"]
    assert bare_names_in("see mid-method.md, `meta.py` and ../x/stack-probe.md, mnist.flags") == {
        "mid-method.md", "meta.py", "mnist.flags"}
    assert _missing("mid-method.md; meta.py; train_timing.py") == ["mid-method.md"]


def test_python_prose_keeps_comments_docstrings_and_help(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""Doc: docs/a.md."""\nx = "docs/d.md"  # see docs/b.md\n'
                     'flags.DEFINE_string("f", None, "help names docs/c.md")\ndocs = 1\n')
    assert paths_in(_python_prose(probe)) == {"docs/a.md", "docs/b.md", "docs/c.md", "docs/d.md"}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_exist(path):
    missing = _missing(scanned_text(path))
    assert not missing, f"{path.relative_to(REPO)} names paths that are not in the repository: {missing}"


@pytest.mark.parametrize("page", [f for f in _doc_files() if f.is_file()],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_links_resolve(page):
    broken = []
    for target in MD_LINK_RE.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # URLs, mailto:, in-page anchors
        rel = target.split("#", 1)[0]
        if rel and not (page.parent / rel).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links that resolve to nothing from its folder: {broken}"


def test_no_session_in_docs():
    """Results are dated by day and CPU; "session" says nothing to a reader who was not there."""
    pages = [REPO / "README.md", *(f for f in sorted((REPO / "docs").rglob("*"))
                                   if f.suffix in (".md", ".json", ".jsonl", ".txt"))]
    hits = []
    for page in pages:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"session", line, re.IGNORECASE):
                hits.append(f"{page.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not hits, "date results by day and CPU, not by 'session':\n" + "\n".join(hits)
