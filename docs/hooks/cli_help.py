"""MkDocs hook: replace ``<!-- bonexray-help: CMD ... -->`` in a page with the output of ``bonexray CMD ... --help``.

The CLI reference is generated from the command itself at build time, so it cannot drift from the code.
It runs the CLI of this checkout (``src/`` first on ``PYTHONPATH``), whatever parser library builds it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*bonexray-help:\s*([a-z0-9 -]*?)\s*-->")
RUN_CLI = "import sys; from bonexray.cli import main; sys.exit(main(sys.argv[1:]))"


def cli_help(words: list[str]) -> str:
    """``bonexray WORDS --help`` as the user sees it, at a fixed width; a non-zero exit fails the build."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *words, "--help"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise PluginError(f"bonexray {' '.join(words)} --help failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout.rstrip().replace("```", "'''")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs' hook signature
    return MARKER.sub(lambda m: "```text\n" + cli_help(m.group(1).split()) + "\n```", markdown)
