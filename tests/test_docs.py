"""The documentation: the README stays short, every relative link resolves, and the MkDocs site builds
with warnings as errors (a broken link, anchor, API reference or `--help` page fails it)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MAX_README_LINES = 260

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"', re.M)


def prose(text: str) -> str:
    """Markdown without code blocks and inline code, where a bracketed word is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(md: Path) -> list[str]:
    return [t for t in LINK.findall(prose(md.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: are not files


def heading_anchors(md: Path) -> set[str]:
    """The ids MkDocs (Python-Markdown's toc) gives the headings of a page."""
    from markdown.extensions.toc import slugify

    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    return {slugify(h.replace("`", ""), "-") for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("index.md", "installation.md", "cli.md", "api.md", "data.md", "training.md", "evaluation.md",
                 "inference.md", "serve.md", "pacs.md", "scope.md", "model-card.md", "results.md",
                 "measurement-log.md", "ARCHITECTURE.md"):
        assert page in names


@pytest.mark.parametrize("md", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md):
    links = relative_links(md)
    if md == README:
        assert links, "the README links to the documentation"
    has_markdown = importlib.util.find_spec("markdown") is not None
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.is_file():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and has_markdown and anchor not in heading_anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    for included in SNIPPET.findall(md.read_text(encoding="utf-8")):
        if not (ROOT / included).is_file():
            broken.append(f"--8<-- {included} (no file)")
    assert not broken, f"{md.name}: " + "; ".join(broken)


def test_readme_commands_are_what_ci_runs():
    """The README's install and test commands are the ones .ci/run runs, and CI builds the site strictly."""
    readme = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r"## Install \(one command\).*?```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    tests = re.search(r"## Tests \(one command\).*?```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    assert install == 'pip install -e ".[dev]"' and install in ci.splitlines()
    assert tests == "pytest" and ci.rstrip().splitlines()[-1] == tests
    lines = ci.splitlines()
    assert lines.index("mkdocs build --strict") > lines.index(install), "the site is built after the install"
    assert lines.index("mkdocs build --strict") < lines.index(tests), "and before the tests"
    assert "/site/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_api_page_documents_the_public_api():
    import bonexray

    page = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in ("load_model", "Model", "Prediction"):
        assert f"::: bonexray.api.{name}" in page, name
    assert "::: bonexray.data.datasets.load_dataset" in page
    assert set(bonexray.__all__) - {"__version__"} == {"Model", "Prediction", "load_dataset", "load_model"}


def cli_help(capsys, *words: str) -> str:
    from bonexray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def subcommands(help_text: str) -> list[str]:
    """The command names `--help` lists (an indented name, then its help on that line or the next)."""
    return re.findall(r"^ {2,6}([a-z][a-z-]+)(?: {2,}\S| *$)", help_text, re.M)


def test_cli_page_covers_every_command(capsys):
    """Each command and pacs subcommand that `--help` lists has its generated `--help` on the CLI page."""
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands = subcommands(cli_help(capsys))
    assert {"train", "evaluate", "predict", "serve", "calibrate-scope", "pacs"} <= set(commands)
    pacs = subcommands(cli_help(capsys, "pacs"))
    assert {"analyze", "listen"} <= set(pacs)
    for command in [*commands, *(f"pacs {sub}" for sub in pacs)]:
        assert f"<!-- bonexray-help: {command} -->" in page, command


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason='mkdocs / mkdocstrings not installed (pip install -e ".[dev]")')
def test_site_builds_strict(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "results.html").is_file()
    cli = (site / "cli.html").read_text(encoding="utf-8")
    assert "usage: bonexray train" in cli and "usage: bonexray pacs listen" in cli  # generated from --help
    api = (site / "api.html").read_text(encoding="utf-8")
    assert 'id="bonexray.api.load_model"' in api and 'id="bonexray.core.findings.ImageFinding.in_scope"' in api and 'id="bonexray.core.findings.ImageFinding.finding"' in api
    assert "Backend check" in (site / "measurement-log.html").read_text(encoding="utf-8")  # bench/RESULTS.md included
