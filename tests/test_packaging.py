"""Layout and environment: one dependency list, the top level the user asked for, CI = README's command."""
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_top_level_layout():
    for name in ("notebooks", "kts", "environment.yml", "data_manifest.csv", "tests", "README.md", "LICENSE",
                 "pyproject.toml", ".ci/run"):
        assert (ROOT / name).exists(), name


def test_environment_yml_installs_pyproject_and_nothing_else():
    """environment.yml may pin python and pip; every other dependency comes from pyproject.toml."""
    text = (ROOT / "environment.yml").read_text()
    lines = [ln.split("#")[0].rstrip() for ln in text.splitlines()]
    entries = [ln.strip()[2:].strip() for ln in lines if ln.strip().startswith("- ")]
    assert "conda-forge" in entries
    conda = [e for e in entries if e not in ("conda-forge", "pip", "pip:") and not e.startswith("-e")]
    python_pins = [e for e in conda if e.startswith("python")]
    assert len(python_pins) == 1 and conda == python_pins, f"conda dependencies beyond python: {conda}"
    assert any(e in ("-e .", ".") for e in entries), "environment.yml must pip-install this package"
    version = re.match(r"python[=<>]*(\d+\.\d+)", python_pins[0]).group(1)
    requires = _pyproject()["project"]["requires-python"]
    low = re.search(r">=\s*(\d+\.\d+)", requires).group(1)
    high = re.search(r"<\s*(\d+\.\d+)", requires).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))
    assert as_tuple(low) <= as_tuple(version) < as_tuple(high)


def test_stack_pins_the_issue_asks_for():
    deps = {re.split(r"[<>=~\[ ]", d)[0].lower(): d for d in _pyproject()["project"]["dependencies"]}
    assert deps["tensorflow"] == "tensorflow==2.20.0"
    assert deps["tf-models-official"] == "tf-models-official==2.20.0"
    for name in ("keras", "tf-keras", "numpy", "matplotlib", "pydicom", "scikit-image", "papermill", "nbval",
                 "ipywidgets", "jupyterlab", "ipykernel"):
        assert name in deps, name
    assert "tensorflow-cpu" not in deps


def test_ci_runs_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_command = [c.strip() for c in commands if "test" in c and c.strip().startswith("make")]
    assert test_command, "README must show its test command in a bash block"
    assert test_command[0] in ci.splitlines()


def test_readme_results_are_generated_not_typed():
    """README's results and benchmark blocks are exactly what the code renders from results/."""
    import pytest

    from kts import pipeline

    results = ROOT / "results"
    readme = (ROOT / "README.md").read_text()
    if not (results / "metrics.json").exists():
        pytest.skip("no committed paper-profile results yet")
    expected = readme
    for name, body in pipeline.readme_blocks(results).items():
        expected = pipeline.replace_block(expected, name, body)
    assert readme == expected, "README is stale: run `python -m kts run --update-readme`"


def test_readme_parameter_count_is_the_built_models():
    """README quotes the default CU-Net's size; it must be what build_cunet builds, not a typed-in guess."""
    from kts import build_cunet
    from kts.cunet import forward_flops

    model = build_cunet()
    readme = (ROOT / "README.md").read_text()
    assert f"**{model.count_params():,} parameters**" in readme
    assert f"{forward_flops(model) / 1e9:.2f} GFLOP" in readme


def test_goals_table_judges_each_goal_from_results(tmp_path):
    """README's goals table: a partition under the bar makes the goal "missed", with how many met."""
    import pandas as pd

    from kts import pipeline

    pd.DataFrame({"partition": ["a", "b"], "kidney_dice_mean": [0.96, 0.94], "tumor_dice_mean": [0.9, 0.86],
                  "instance_f1_mean": [0.95, float("nan")]}).to_csv(tmp_path / "table1.csv", index=False)
    goals = pipeline.goal_values(tmp_path)
    assert goals["kidney_dice"]["met"] is False and goals["kidney_dice"]["n_met"] == 1
    assert goals["tumor_dice"]["met"] is True
    assert goals["instance_f1"]["met"] is False  # an undefined F1 is not a met goal
    assert goals["unseen_contrast_dice"]["met"] is None
    text = pipeline.goals_section(tmp_path)
    assert "| 0.940-0.960 | missed (1 of 2 met) |" in text and "not measured in this run" in text


def test_the_unseen_contrast_goals_read_notebook_07s_table(tmp_path):
    """Issue 16's goals: unseen Dice, unseen/seen ratio (best recipe, worst weighting), and the synth recipe's
    epoch time over the paper recipe's (each left-out weighting; a run without times is not measured)."""
    import pandas as pd

    from kts import pipeline

    rows = [("t1_pre", "none", 0.90, 0.20, 10.0), ("t1_pre", "synth", 0.92, 0.90, 14.0),
            ("t2", "none", 0.91, 0.30, 10.0), ("t2", "synth", 0.93, 0.89, 16.0)]
    pd.DataFrame(rows, columns=["held_out", "intensity", "test_seen_dice", "test_unseen_dice", "s_per_epoch"]).to_csv(
        tmp_path / "contrasts.csv", index=False)
    goals = pipeline.goal_values(tmp_path)
    assert goals["unseen_contrast_dice"]["values"] == [0.89] and goals["unseen_contrast_dice"]["met"] is False
    assert goals["unseen_over_seen_dice"]["values"] == [pytest.approx(0.89 / 0.93)]
    assert goals["synth_epoch_time_ratio"]["values"] == [1.4, 1.6] and goals["synth_epoch_time_ratio"]["n_met"] == 1


# kts's floors, bottom first: a module may import (at module level or inside a function) only from
# floors below its own. Data flow runs phantom -> DICOM -> data -> models -> cascade -> metrics -> plots;
# the imports point the other way, down to the small modules everything shares.
LAYERS = (
    ("errors", "io", "config"),
    ("metrics", "cunet", "dicom", "synth"),
    ("masks",),
    ("data",),
    ("phantom", "train", "maskrcnn"),
    ("manifest", "cascade", "reference", "runs", "plots", "proposals"),
    ("fetch", "pretrain", "explorer"),
    ("workflow",),
    ("study", "contrasts"),
    ("pipeline",),
    ("teaching", "publish", "bench"),
    ("cli", "__init__"),
    ("__main__",),
)


def _kts_imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "kts":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kts."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("kts.")}
    return found


def test_no_module_imports_one_above_it():
    """issue 14: the package's layering holds, for module-level and function-level imports alike."""
    floor = {name: i for i, names in enumerate(LAYERS) for name in names}
    modules = {p.stem for p in (ROOT / "kts").glob("*.py")}
    assert modules == set(floor), f"place these modules on a floor: {sorted(modules ^ set(floor))}"
    upward = [f"{m} (floor {floor[m]}) imports {x} (floor {floor[x]})"
              for m in sorted(modules) for x in sorted(_kts_imports(ROOT / "kts" / f"{m}.py") & modules)
              if x != m and floor[x] >= floor[m]]
    assert not upward, upward
