"""The README runner (tests/readme.py) on small Markdown samples: blocks run with bash, state
carried within a section, `# →` answers checked, a broken command or a wrong answer fails, a
block neither run nor marked cannot hide. The README itself runs in tests/system/test_readme.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.readme import DOCUMENTS, ReadmeError, check, parse, run_document

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = """# Tool

## First steps

```sh
GREETING=hello
echo "$GREETING world"
# → hello world
```

Then:

```sh
printf '{"id": "up_1", "status": "pending", "url": "http://127.0.0.1:5000/u/1", "n": 3}\\n201\\n'
# → 201 {"id": "…", "status": "pending", …}
echo "$GREETING again"   # set in the block above
# → hello …
```

<!-- readme: not run — needs a Cloudflare account -->
```sh
exit 1
```

## Elsewhere

```sh
echo "${GREETING:-unset}"
# → unset
```
"""


def _run(markdown: str, tmp_path: Path) -> object:
    return run_document(markdown, cwd=tmp_path, env=dict(os.environ))


def test_blocks_run_in_order_carry_state_within_a_section_and_check_answers(tmp_path):
    ran = _run(SAMPLE, tmp_path)
    assert [b.line for b in ran.run] == [5, 13, 27]
    assert [(b.line, b.skip_reason) for b in ran.skipped] == [(21, "needs a Cloudflare account")]


def test_a_broken_command_fails_naming_its_line(tmp_path):
    broken = SAMPLE.replace('echo "$GREETING again"', "curl --no-such-option")
    with pytest.raises(ReadmeError, match=r"README\.md line 16 failed"):
        _run(broken, tmp_path)


def test_a_wrong_answer_fails(tmp_path):
    with pytest.raises(ReadmeError, match="expected status 201"):
        _run(SAMPLE.replace("\\n201\\n", "\\n200\\n"), tmp_path)
    with pytest.raises(ReadmeError, match="expected"):
        _run(SAMPLE.replace('"status": "pending", "url"', '"status": "ready", "url"'), tmp_path)


def test_an_unmarked_block_runs_and_a_bash_block_is_refused(tmp_path):
    unmarked = SAMPLE.replace("<!-- readme: not run — needs a Cloudflare account -->\n", "")
    with pytest.raises(ReadmeError, match="failed"):
        _run(unmarked, tmp_path)
    with pytest.raises(ReadmeError, match="write shell blocks as ```sh"):
        parse(SAMPLE.replace("```sh\nexit 1", "```bash\nexit 1"))
    with pytest.raises(ReadmeError, match="without a reason"):
        parse(SAMPLE.replace("needs a Cloudflare account", ""))


@pytest.mark.parametrize(
    ("expected", "printed", "good"),
    [
        ('{"a": 1, …}', '{"a": 1, "b": 2}', True),
        ('{"a": 1}', '{"a": 1, "b": 2}', False),  # no `…`: exactly these keys
        ('{"a": …, "b": "x…z"}', '{"a": [1], "b": "xyz"}', True),
        ('{"a": "…"}', '{"a": null}', True),
        ('{"a": "x…"}', '{"a": "y"}', False),
        ('{"items": [{"id": "…"}, …]}', '{"items": [{"id": "1"}, {"id": "2"}]}', True),
        ('{"items": []}', '{"items": [{"id": "1"}]}', False),
        ("200 {}", "{}\n200", True),
        ("200", "{}\n202", False),
        ("whsec_…", "whsec_abc\n", True),
        ("1", "true", False),
    ],
)
def test_expected_answers(expected, printed, good):
    assert (check(expected, printed) is None) is good


def test_the_readmes_reader_flows_are_not_marked_away():
    """The README and the guide parse (no stray shell block, no marker without a reason), and
    each flow a reader runs against make run's stack keeps blocks that run (checked here, in
    make test, before the system suite runs them)."""
    from tests.system.test_readme import FLOWS

    sections = [s for d in DOCUMENTS for s in parse((ROOT / d).read_text(), d)]
    running = {s.title for s in sections if any(b.skip_reason is None for b in s.blocks)}
    assert not FLOWS - running, FLOWS - running
