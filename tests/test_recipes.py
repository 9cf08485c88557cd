"""Every recipe parses (``--print_config``) and instantiates its trainer, model and data module, so none rots."""

import sys
from pathlib import Path

import pytest

from lit_keomni.cli import KeOmniCLI, main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(ROOT.glob("recipes/**/*.yaml"))
CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto"]
"""recipes/paper/ target CUDA nodes: here their trainer is built for this CPU (test_paper_recipes checks the rest)."""


def test_there_are_recipes():
    assert (ROOT / "recipes" / "stage1.yaml") in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses_and_instantiates(recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit_keomni"])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_keomni.stages." in printed and "class_path: datamodules." in printed
    overrides = CPU_OVERRIDES if "paper" in recipe.relative_to(ROOT).parts else []
    cli = KeOmniCLI(args=["--config", str(recipe), *overrides], run=False)
    assert cli.model.hparams and cli.datamodule is not None
    header = recipe.read_text().splitlines()[:3]
    assert header[0].startswith("# Stage") and any("python -m lit_keomni fit --config" in line for line in header)


def test_unknown_recipe_key_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit_keomni"])
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "stage1.yaml").read_text().replace("    lr: 1.5e-3", "    learning_rat: 1.5e-3"))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def test_help_lists_stages_and_recipes(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "stage1" in out and "recipes/stage1.yaml" in out and "tokenize" in out and "prepare" in out
