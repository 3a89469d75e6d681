"""The README stays true: its example output, its commands, its file tree."""

from __future__ import annotations

import re

from .conftest import ROOT, vlmft

README = (ROOT / "README.md").read_text()


def test_bad_recipe_example_prints_what_the_readme_shows():
    block = re.search(r"```\n\$ (vlmft train [^\n]+)\n(.*?)```", README, re.S)
    cmd, expected = block.group(1), block.group(2).strip().splitlines()
    p = vlmft(*cmd.split()[1:])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == expected


def test_listed_commands_run():
    for cmd in ("vlmft lr-table recipes/internvl2_5-78b.yaml --by layer",
                "vlmft pack-stats recipes/demo.yaml"):
        assert cmd in README
        p = vlmft(*cmd.split()[1:])
        assert p.returncode == 0, p.stderr[-2000:]


def test_every_file_in_the_layout_exists():
    tree = README.split("## Layout", 1)[1].split("```")[1]
    names = re.findall(r"^\s*([\w./-]+\.(?:py|yaml|toml|md))\b", tree, re.M)
    assert len(names) > 15
    found = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts}
    missing = [n for n in names if n.split("/")[-1] not in found]
    assert not missing, missing
    # and the other way: every module of the package has its line (models/ lists its files inline)
    unlisted = [str(p.relative_to(ROOT / "vlmft")) for p in (ROOT / "vlmft").rglob("*.py")
                if p.name != "__init__.py" and not re.search(rf"(^|[\s/]){re.escape(p.name)}\b", tree, re.M)]
    assert not unlisted, f"README layout lacks {unlisted}"


def test_record_examples_are_records_in_either_format():
    import json

    from vlmft.data import sources

    blocks = re.findall(r"```json\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        turns, _ = sources.turns(json.loads(block))
        assert [role for role, _ in turns][-1] == "assistant"


def test_recipe_commands_run():
    for cmd in ("vlmft recipe data.packing", "vlmft recipe --init > my.yaml", "vlmft --version"):
        assert cmd in README
    p = vlmft("recipe", "data.packing")
    assert p.returncode == 0 and "data.packing.max_packed_tokens: int = 1024" in p.stdout


def test_the_families_table_is_the_registry():
    """Every supported model type is in the README's table, and every table row is a family."""
    from vlmft.models import FAMILIES

    from . import tiny_models

    table = README.split("## Model families", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    listed = {t.strip(" `") for r in rows for t in r[1].split(",")}
    assert listed == {t for f in FAMILIES for t in f.model_types}
    tested = {"internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision",
              "idefics3", "smolvlm", "gemma3", "paligemma"}
    assert tested == set(tiny_models.FAMILIES)   # each row but Qwen3.5's has its packed-row test
    assert len(rows) == len(FAMILIES)
