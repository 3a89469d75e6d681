"""The README's evaluation section is real output: the demo trained as `make demo` trains it, then
`vlmft eval` on the base model and on the trained one. The text must match; the figures within
0.01 (another machine's CPU rounds a little differently).

    VLMFT_REFRESH_README=1 pytest tests/test_readme_eval.py    # rewrites the block in README.md
"""

from __future__ import annotations

import os
import re

import pytest

from .conftest import DEMO, ROOT, vlmft

pytestmark = pytest.mark.slow
BLOCK = re.compile(r"(<!-- eval-demo -->\n```\n)(.*?)(```\n<!-- /eval-demo -->)", re.S)
NUMBER = re.compile(r"\d+\.\d+|\d+")


def fresh_block(out) -> str:
    p = vlmft("train", str(DEMO), f"output_dir={out}", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    text = ""
    for cmd, args in (("vlmft eval recipes/demo.yaml", []),
                      ("vlmft eval recipes/demo.yaml --model runs/demo/final", ["--model", f"{out}/final"])):
        q = vlmft("eval", str(DEMO), f"output_dir={out}", *args, timeout=600)
        assert q.returncode == 0, q.stderr[-2000:]
        table = "\n".join(line.rstrip() for line in q.stdout.strip().splitlines())
        text += f"$ {cmd}\n" + table.replace(f"{out}/final", "runs/demo/final") + "\n"
    return text


def test_the_readme_eval_section_is_what_vlmft_eval_prints(tmp_path):
    readme = (ROOT / "README.md").read_text()
    shown = BLOCK.search(readme).group(2)
    got = fresh_block(tmp_path / "demo")
    if os.environ.get("VLMFT_REFRESH_README"):
        (ROOT / "README.md").write_text(BLOCK.sub(lambda m: m.group(1) + got + m.group(3), readme))
        return
    assert NUMBER.sub("#", got) == NUMBER.sub("#", shown), f"refresh the README block with:\n{got}"
    for a, b in zip(NUMBER.findall(got), NUMBER.findall(shown)):
        assert abs(float(a) - float(b)) <= 0.01 + 0.01 * abs(float(b)), f"refresh the README block with:\n{got}"
