"""Run a Markdown file's shell blocks the way a reader does, and check the answers it shows.

The convention (every file of DOCUMENTS follows it):
- every fenced block whose info string is `sh` is run with bash (`set -euo pipefail`), in a
  working folder and environment the caller prepares (a live stack);
- a block that must not run says so on the line right before its fence:
  `<!-- readme: not run — <reason> -->`; a block marked so runs nothing;
- the blocks of one `##` section run in one bash process, in order, so what one sets (`TOKEN`,
  `ID`) the next one reads; processes a section starts in the background are stopped after it;
- `# → <expected>` after a command checks what the commands since the previous check (or the
  block's start) printed on stdout: an optional HTTP status first (curl's `-w '%{http_code}'`
  prints it), then JSON or text, where `…` stands for anything. In JSON, `"…"` or a bare `…`
  matches any value, `"http://…/x"` any text in its place, and a trailing `, …` allows more keys
  (or items); without it the keys must be exactly those shown;
- a shell block under another info string (`bash`, `shell`, `console`) is an error: it would
  escape both the run and the marker.

The caller may give `replace`, text substituted before a block runs (the README's
`localhost:5000` becomes the test stack's port).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```(\S*)\s*$")
# `<!-- readme: not run — reason -->`, with an em dash (or an en dash, or hyphens).
NOT_RUN = re.compile(
    r"<!--\s*readme:\s*not run\s*[\u2014\u2013-]+\s*(?P<reason>.*?)\s*-->\s*$", re.S
)
# The Markdown files whose `sh` blocks CI runs: the README and the operations guide it links to.
DOCUMENTS = ("README.md", "broker/OPERATIONS.md")
CHECK = re.compile(r"^\s*#\s*→\s?(?P<expected>.*)$")
SHELLISH = {"bash", "shell", "console", "zsh", "shell-session"}
ANY = "…"


class ReadmeError(AssertionError):
    """A block is malformed, failed, or printed something other than what the text shows."""


@dataclass
class Chunk:
    """Commands up to a `# →` check (or the block's end), and what they must print."""

    code: str
    line: int
    expected: str | None


@dataclass
class Block:
    """One fenced `sh` block."""

    section: str
    line: int  # of the opening fence, 1-based
    text: str
    skip_reason: str | None = None

    def chunks(self) -> list[Chunk]:
        """Split the block at its `# →` lines."""
        chunks: list[Chunk] = []
        code: list[str] = []
        start = self.line + 1
        for offset, raw in enumerate(self.text.splitlines()):
            found = CHECK.match(raw)
            if not found:
                code.append(raw)
                continue
            expected = found.group("expected").strip()
            if not code and chunks and chunks[-1].expected is not None:
                chunks[-1].expected += " " + expected  # a check continued on the next line
                continue
            chunks.append(Chunk("\n".join(code), start, expected))
            code, start = [], self.line + 2 + offset
        if any(line.strip() for line in code):
            chunks.append(Chunk("\n".join(code), start, None))
        return chunks


@dataclass
class Section:
    """The blocks of one `##` section, run in one shell."""

    title: str
    document: str = "README.md"
    blocks: list[Block] = field(default_factory=list)


def parse(markdown: str, document: str = "README.md") -> list[Section]:
    """Return the sections holding shell blocks, in order; refuse shell blocks outside `sh`."""
    sections: list[Section] = []
    title = "(top)"
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            title = line[3:].strip()
        fence = FENCE.match(line)
        if not fence:
            index += 1
            continue
        info = fence.group(1)
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if info in SHELLISH:
            raise ReadmeError(f"line {index + 1}: a {info!r} block: write shell blocks as ```sh")
        if info == "sh":
            block = Block(title, index + 1, "\n".join(lines[index + 1 : end]))
            before = "\n".join(lines[max(0, index - 3) : index])
            marked = NOT_RUN.search(before[before.rfind("<!--") :]) if "<!--" in before else None
            if marked and lines[index - 1].rstrip().endswith("-->"):
                block.skip_reason = " ".join(marked.group("reason").split())
                if not block.skip_reason:
                    raise ReadmeError(f"line {index + 1}: `readme: not run` without a reason")
            if not sections or sections[-1].title != title:
                sections.append(Section(title, document))
            sections[-1].blocks.append(block)
        index = end + 1
    return sections


# -- checking what was printed ---------------------------------------------------------------


def _json_pattern(text: str) -> Any:
    """Read the README's JSON-with-ellipses as JSON, each `…` a wildcard."""
    text = re.sub(r",\s*…\s*([}\]])", r', "…"\1', text)  # trailing `, …`: more allowed
    text = re.sub(r"([{\[])\s*…\s*([}\]])", r'\1"…"\2', text)
    text = re.sub(r"(?<=[:\[,])(\s*)…(?=\s*[,}\]])", r'\1"…"', text)  # a bare value
    text = re.sub(r'\{\s*"…"\s*}', '{"…": "…"}', text)
    text = re.sub(r',\s*"…"\s*}', ', "…": "…"}', text)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ReadmeError(f"the expected answer is not JSON with ellipses: {text}") from exc


def _text_matches(pattern: str, actual: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split(ANY))
    return re.fullmatch(regex, actual, re.S) is not None


def _matches(expected: Any, actual: Any) -> bool:
    if expected == ANY:
        return True
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        more = expected.get(ANY) == ANY
        keys = set(expected) - {ANY}
        if not keys <= set(actual) or (not more and set(actual) != keys):
            return False
        return all(_matches(expected[k], actual[k]) for k in keys)
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return False
        more = bool(expected) and expected[-1] == ANY
        items = expected[:-1] if more else expected
        if len(actual) < len(items) or (not more and len(actual) != len(items)):
            return False
        return all(_matches(e, a) for e, a in zip(items, actual, strict=False))
    if isinstance(expected, str) and ANY in expected:
        return isinstance(actual, str) and _text_matches(expected, actual)
    return bool(expected == actual and type(expected) is type(actual))


def check(expected: str, printed: str) -> str | None:
    """Return why `printed` is not what `expected` shows, or None when it is."""
    status = re.match(r"(\d{3})(?:\s+|$)", expected)
    body = expected[status.end() :].strip() if status else expected.strip()
    out = printed.strip()
    if status:
        lines = out.splitlines()
        if not lines or lines[-1].strip() != status.group(1):
            return f"expected status {status.group(1)}, the last line printed is {lines[-1:]}"
        out = "\n".join(lines[:-1]).strip()
    if not body:
        return None
    if body[0] in "{[":
        try:
            value = json.loads(out)
        except ValueError:
            return f"expected JSON like {body}, got {out!r}"
        return None if _matches(_json_pattern(body), value) else f"expected {body}, got {out}"
    flat = " ".join(out.split())
    return None if _text_matches(" ".join(body.split()), flat) else f"expected {body}, got {flat}"


# -- running ---------------------------------------------------------------------------------


@dataclass
class Ran:
    """What running a document did: the blocks run and the blocks skipped (with reasons)."""

    run: list[Block] = field(default_factory=list)
    skipped: list[Block] = field(default_factory=list)


def _script(section: Section, workdir: Path, replace: dict[str, str]) -> tuple[str, list[Chunk]]:
    parts = ["set -euo pipefail"]
    chunks: list[Chunk] = []
    for block in section.blocks:
        if block.skip_reason is not None:
            continue
        for chunk in block.chunks():
            code = chunk.code
            for old, new in replace.items():
                code = code.replace(old, new)
            n = len(chunks)
            chunks.append(chunk)
            parts.append(f"echo {n} > {workdir}/.readme-at")
            parts.append(f"{{\n{code}\n}} > {workdir}/.readme-out-{n}")
    parts.append(f"echo done > {workdir}/.readme-at")
    return "\n".join(parts) + "\n", chunks


def run_section(
    section: Section,
    *,
    cwd: Path,
    env: dict[str, str],
    replace: dict[str, str] | None = None,
    timeout: float = 300,
) -> None:
    """Run a section's blocks in one bash; raise ReadmeError naming the line that failed."""
    script, chunks = _script(section, cwd, replace or {})
    if not chunks:
        return
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise ReadmeError(f"{section.title}: still running after {timeout:.0f}s") from None
    finally:
        # What the section started in the background (a server, a worker) ends with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    at = (cwd / ".readme-at").read_text().strip()
    if process.returncode != 0:
        where = chunks[int(at)].line if at.isdigit() else "?"
        raise ReadmeError(
            f"{section.title}: the command at {section.document} line {where} failed"
            f" (exit {process.returncode}):\n{stderr[-3000:]}"
        )
    for n, chunk in enumerate(chunks):
        if chunk.expected is None:
            continue
        printed = (cwd / f".readme-out-{n}").read_text(errors="replace")
        problem = check(chunk.expected, printed)
        if problem:
            raise ReadmeError(f"{section.title}, {section.document} line {chunk.line}: {problem}")


def run_document(
    markdown: str,
    *,
    cwd: Path,
    env: dict[str, str],
    replace: dict[str, str] | None = None,
    only: set[str] | None = None,
    document: str = "README.md",
) -> Ran:
    """Run every unmarked `sh` block of `markdown` (of the sections in `only`, if given)."""
    ran = Ran()
    for section in parse(markdown, document):
        if only is not None and section.title not in only:
            continue
        ran.skipped += [b for b in section.blocks if b.skip_reason is not None]
        run_section(section, cwd=cwd, env=env, replace=replace)
        ran.run += [b for b in section.blocks if b.skip_reason is None]
    return ran
