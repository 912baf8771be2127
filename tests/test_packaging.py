"""The packaging files agree with each other."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return req.replace(" ", "").lower()


def test_conda_yaml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(map(_norm, pip_section)) == sorted(map(_norm, deps))
    assert "python=3.11" in conda["dependencies"]


def test_distribution_name_is_not_the_unrelated_pypi_cellseg():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != "cellseg"
    assert project["scripts"]["cellseg"] == "cellseg.cli:main"
    assert any(d.startswith("torch==") for d in project["dependencies"])


def test_mlproject_uses_conda_yaml_and_has_entry_points():
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    assert mlproject["conda_env"] == "conda.yaml"
    assert {"main", "train", "experiments"} <= set(mlproject["entry_points"])


def test_every_script_compiles():
    """bench/ scripts are run by `make bench`, not imported by tests: a syntax error there went unseen."""
    for path in sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("pipelines/*.py"), *ROOT.glob("cellseg/**/*.py")]):
        compile(path.read_text(), str(path), "exec")  # SyntaxError names the file and line
