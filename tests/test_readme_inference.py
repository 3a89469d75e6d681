"""The README's inference lines, run as written on the demo trained as `make demo` trains it:
stock transformers (AutoProcessor, AutoModelForImageTextToText, the chat template, generate) and
`vlmft chat` give the answer training taught for a training sample, and generation stops at the
chat template's end of turn (not at max_new_tokens)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex

import pytest

from .conftest import ROOT, vlmft

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()
PYTHON = re.search(r"<!-- inference -->\n```python\n(.*?)```\n<!-- /inference -->", README, re.S).group(1)
SHELL = re.search(r"<!-- chat -->\n```\n\$ (vlmft chat .*?)\n(.*?)\n```", README, re.S)


def _taught_answer(image: str, question: str) -> str:
    """The answer of the demo's training record with that image and question (the reference)."""
    for line in (ROOT / "demo" / "data" / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        turns = r["conversations"]
        if f"demo/data/{r.get('image')}" == image and turns[0]["value"].endswith(question):
            return turns[1]["value"]
    raise AssertionError(f"no training record with {image} and {question!r}")


def test_the_readme_inference_lines_answer_as_trained(trained_demo, monkeypatch):
    image = re.search(r'Image\.open\("([^"]+)"\)', PYTHON).group(1)
    question = re.search(r'"text": "([^"]+)"', PYTHON).group(1)
    expected = _taught_answer(image, question)
    monkeypatch.chdir(ROOT)
    ns, buf = {}, io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(PYTHON.replace("runs/demo/final", str(trained_demo / "final")), ns)
    assert buf.getvalue().strip() == expected
    # it stopped at the end of the assistant's turn, well before max_new_tokens
    new = ns["out"][0, ns["inputs"]["input_ids"].shape[1]:].tolist()
    eos = ns["model"].generation_config.eos_token_id
    assert new[-1] in (eos if isinstance(eos, list) else [eos]) and len(new) < 32, new


def test_vlmft_chat_prints_what_the_readme_shows(trained_demo):
    cmd, shown = SHELL.group(1), SHELL.group(2)
    args = shlex.split(cmd.replace("runs/demo/final", str(trained_demo / "final")))[1:]
    p = vlmft(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == shown.strip()
