"""The marked snippets of README.md and docs/*.md run as written, so the docs cannot drift from the code.

A fenced block is run when the line right before it is ``<!-- readme-test -->``; the blocks of all
pages share one sandbox, README.md's first, then the docs pages in name order. The run
happens in a sandbox that looks like a new user's machine after the downloads, with no
network: the working folder holds ``./OpenELM-270M-Instruct`` (a synthetic, tokenizer-less
checkpoint, like Apple's) and ``./tokenizer.model``; the Hugging Face cache (offline) holds the
same checkpoint as the default model repo and the tokenizer as the default tokenizer repo.

- ``python`` blocks run with this interpreter.
- ``bash`` blocks run with ``bash -e``; stdin carries two chat messages. ``pip install`` is not
  run (its extras are checked against pyproject.toml instead), nor ``hf download`` (the sandbox
  already holds what it fetches), nor ``python -m pytest`` (that is this run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_openelm.hub import DEFAULT_MODEL, DEFAULT_TOKENIZER_REPO

from synthetic import TINY_CONFIG, cache_repo, random_weights, write_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- readme-test -->"
STDIN = "Hi!\nWhat is MLX?\n"

FENCE = re.compile(r"^```(\w+)\s*$")

# Shell functions that stand in for the steps a test run must not repeat.
BASH_PREAMBLE = """
pip() { echo "[readme-test] not run: pip $*" >&2; }
hf() { echo "[readme-test] not run: hf $*" >&2; }
python() {
  if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pytest" ]; then echo "[readme-test] not run: python $*" >&2; return 0; fi
  command python "$@"
}
"""


def fenced_blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """(line number, language, code, marked) for every fenced block of a Markdown text."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        marked = start > 0 and lines[start - 1].strip() == MARKER
        blocks.append((start + 1, match.group(1), "\n".join(body) + "\n", marked))
        i += 1
    return blocks


def marked_blocks() -> list[tuple[str, int, str, str]]:
    """(page relative to the root, line, language, code) of every marked block of every page."""
    return [(page.relative_to(ROOT).as_posix(), line, lang, code) for page in PAGES
            for line, lang, code, marked in fenced_blocks(page.read_text()) if marked]


def test_fence_parser_reads_markers_languages_and_bodies():
    text = f"intro\n{MARKER}\n```bash\necho a\necho b\n```\n\n```python\nx = 1\n```\n"
    assert fenced_blocks(text) == [(3, "bash", "echo a\necho b\n", True), (8, "python", "x = 1\n", False)]


def test_the_quick_start_is_tested_and_has_the_two_commands():
    blocks = fenced_blocks(README.read_text())
    _line, lang, code, marked = blocks[0]
    assert lang == "bash" and marked, "README's first block (the quick start) must be marked " + MARKER
    commands = [c for c in code.splitlines() if c.strip() and not c.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    assert "mlx-openelm chat" in commands[0] and "python -m pytest" in commands[1]


def test_pip_install_lines_name_existing_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = re.findall(r"pip install [^\n]*?\.\[([\w,]+)\]", README.read_text())
    assert named, "the README says how to install the test extra"
    for group in named:
        assert set(group.split(",")) <= extras, f".[{group}] names an extra pyproject.toml lacks"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered (-1, -2, ...)."""
    anchors, counts = set(), {}
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"^#{1,6} (.+?)\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_heading_anchors_follow_github():
    text = "# A trained model (SmolLM2-135M)\n```bash\n# not a heading\n```\n## Mixed (`--recipe x-Y`)\n## Fuse\n## Fuse\n"
    assert heading_anchors(text) == {"a-trained-model-smollm2-135m", "mixed---recipe-x-y", "fuse", "fuse-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_links_reach_existing_files_and_headings(page):
    """A relative link names a tracked file, and its #anchor (or a bare #anchor) a heading there."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif fragment and (file.suffix != ".md" or fragment not in heading_anchors(file.read_text())):
            broken.append(target)
    assert broken == [], f"{page.name}: links to nothing"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert sorted(page.name for page in PAGES[1:] if page.resolve() not in linked) == []

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tokenizer_path):
    """A working folder and an offline Hugging Face cache holding what the README downloads."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    checkpoint = write_hf_checkpoint(work / "OpenELM-270M-Instruct", TINY_CONFIG, random_weights(TINY_CONFIG))
    shutil.copyfile(tokenizer_path, work / "tokenizer.model")
    cache = root / "hf-cache"
    cache_repo(cache, DEFAULT_MODEL, {p.name: p for p in checkpoint.iterdir()})
    cache_repo(cache, DEFAULT_TOKENIZER_REPO, {"tokenizer.model": tokenizer_path})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLX_OPENELM_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there: no request can leave the machine
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        PYTHONWARNINGS="ignore",
    )
    return work, env


def run_block(sandbox, lang: str, code: str) -> subprocess.CompletedProcess:
    work, env = sandbox
    if lang == "python":
        command = [sys.executable, "-c", code]
    elif lang in ("bash", "sh"):
        command = ["bash", "-e", "-c", BASH_PREAMBLE + code]
    else:
        raise ValueError(f"cannot run a {lang!r} block; mark only bash or python blocks")
    return subprocess.run(command, cwd=work, env=env, input=STDIN, capture_output=True, text=True, timeout=300)


def test_the_sandbox_runs_commands_offline_and_reports_failures(sandbox):
    ok = run_block(sandbox, "bash", "pip install -e .\npython -m pytest\nls OpenELM-270M-Instruct tokenizer.model\n")
    assert ok.returncode == 0 and "config.json" in ok.stdout and "not run: pip install -e ." in ok.stderr
    assert run_block(sandbox, "bash", "false\necho unreachable\n").returncode != 0
    fetch = run_block(sandbox, "python", "from mlx_openelm.hub import resolve_model_path\n"
                                         "resolve_model_path('apple/OpenELM-3B')\n")
    assert fetch.returncode != 0 and "HF_HUB_OFFLINE is set" in fetch.stderr


@pytest.mark.parametrize("page, line, lang, code", [pytest.param(*block, id=f"{block[0]}:{block[1]}")
                                                    for block in marked_blocks()])
def test_readme_block_runs(sandbox, page, line, lang, code):
    result = run_block(sandbox, lang, code)
    assert result.returncode == 0, f"{page}:{line} failed:\n{code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr
    if "mlx-openelm chat" in code:  # one reply (and its statistics note) per message on stdin
        assert result.stderr.count(" tok/s | prompt: ") == len(STDIN.splitlines()), result.stderr


def test_ci_installs_and_tests_as_the_readme_full_suite_line_says():
    full = next(code for _line, lang, code, _marked in fenced_blocks(README.read_text())
                if lang == "bash" and ".[test,compare,eval]" in code)
    install, test = (part.strip() for part in full.strip().split("&&"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'pip install -q {install.removeprefix("pip install ")}' in ci and f"\n{test}\n" in ci
    assert '"$status" -eq 5' in ci  # pytest's "no tests collected" is not a failure
