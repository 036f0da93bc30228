"""The README's measured blocks are generated from benchmarks/results/*.json by benchmarks/readme.py: a figure in
a block that disagrees with its JSON fails here."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def load_readme_script():
    spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme = load_readme_script()


def test_every_readme_block_matches_its_committed_result():
    _, changed = readme.render((ROOT / "README.md").read_text())
    assert changed == [], f"run python benchmarks/readme.py: {changed} differ from benchmarks/results"


def test_a_result_that_changes_makes_the_check_fail(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    readme_copy = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme_copy)
    assert readme.main(["--check", "--readme", str(readme_copy), "--results", str(results)]) == 0
    students = json.loads((results / "students224.json").read_text())
    students["distill"]["top1"]["teacher"] += 0.0123  # one figure of one block
    (results / "students224.json").write_text(json.dumps(students))
    assert readme.main(["--check", "--readme", str(readme_copy), "--results", str(results)]) == 1
    assert "students224-distill" in capsys.readouterr().err
    assert readme.main(["--readme", str(readme_copy), "--results", str(results)]) == 0  # regenerated
    assert f"{100 * students['distill']['top1']['teacher']:.2f}%" in readme_copy.read_text()
    assert readme.main(["--check", "--readme", str(readme_copy), "--results", str(results)]) == 0


def test_unknown_and_missing_blocks_are_refused():
    text = (ROOT / "README.md").read_text()
    with pytest.raises(SystemExit, match="does not know"):
        readme.render(text + "\n<!-- results:nonesuch -->\n<!-- /results:nonesuch -->\n")
    with pytest.raises(SystemExit, match="lacks the results blocks gpu-h200"):
        readme.render(text.replace("<!-- results:gpu-h200 -->", "").replace("<!-- /results:gpu-h200 -->", ""))
