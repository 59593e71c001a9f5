"""The command line's defaults cannot drift from the config models': every option of a stage command named as a
field of that stage's settings defaults to the field's default (or to None, meaning "the settings' default"),
and every option of `run` that sets a field names one that exists."""

from __future__ import annotations

import inspect

import pytest

from minemap import cli
from minemap.config import (ChipConfig, ExportConfig, ModelConfig, PanelConfig, PostprocessConfig, PredictConfig,
                            RunConfig, TrainConfig, VectorizeConfig)

# each stage command and the settings its options stand for
COMMANDS = {
    "chips": [ChipConfig],
    "train": [TrainConfig, ModelConfig],
    "predict": [PredictConfig],
    "vectorize": [VectorizeConfig],
    "postprocess": [PostprocessConfig],
    "panel": [PanelConfig],
    "export_cmd": [ExportConfig],
}
# options that share a field's name but not its meaning: `export` writes every format unless told otherwise, a
# run the few of ExportConfig.formats (the others on request)
NOT_SETTINGS = {("export_cmd", "formats")}


def _options(name: str) -> dict[str, object]:
    fn = inspect.unwrap(getattr(cli, name))
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty}


def _default(model, field: str):
    value = model.model_fields[field].get_default(call_default_factory=True)
    if isinstance(value, (list, tuple)):  # a list option is given comma-separated on the command line
        return ",".join(map(str, value))
    return value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_stage_options_default_to_the_settings_defaults(command):
    checked, drift = 0, []
    for option, default in _options(command).items():
        if (command, option) in NOT_SETTINGS:
            continue
        for model in COMMANDS[command]:
            if option in model.model_fields:
                checked += 1
                want = _default(model, option)
                if default is not None and default != want:
                    drift.append(f"--{option.replace('_', '-')}: {default!r}, {model.__name__}.{option}: {want!r}")
    assert not drift, drift
    assert checked, f"{command}: no option checked (the command's settings changed?)"


def test_run_options_name_fields_that_exist():
    """`run`'s flags reach the configuration through dotted keys (cli._RUN_FLAGS): each names a real field, and
    `run`'s own defaults are None or off (the configuration's then apply)."""
    for option, keys in cli._RUN_FLAGS.items():
        for dotted in keys:
            model = RunConfig
            *parents, leaf = dotted.split(".")
            for part in parents:
                model = model.model_fields[part].annotation
            assert leaf in model.model_fields, f"--{option}: {dotted} is not a setting"
    opts = _options("run")
    assert set(cli._RUN_FLAGS) <= set(opts), set(cli._RUN_FLAGS) - set(opts)
    assert all(opts[o] in (None, False) for o in cli._RUN_FLAGS), \
        {o: opts[o] for o in cli._RUN_FLAGS if opts[o] not in (None, False)}


def test_the_check_finds_a_drift(monkeypatch):
    """The check above can fail: a command whose default differs from its settings' is caught."""
    def fake(min_area_m2: float = 123.0):
        return min_area_m2

    monkeypatch.setattr(cli, "vectorize", fake)
    with pytest.raises(AssertionError, match="min-area-m2"):
        test_stage_options_default_to_the_settings_defaults("vectorize")


def test_the_stage_list_names_real_commands_settings_and_inputs():
    """`run`'s stages are declared once (minemap.pipeline.STAGES): each names a command of the CLI, a table of
    the settings, stages before it, and outputs inside the run folder."""
    import typer.main

    from minemap.pipeline import STAGES

    commands = {c.name or c.callback.__name__ for c in typer.main.get_command(cli.app).commands.values()}
    seen = {"model"}  # the model mapped with: the fit's, or one given (model.path)
    for stage in STAGES:
        assert stage.command in commands, stage
        assert stage.section is None or stage.section in RunConfig.model_fields, stage
        assert set(stage.after) <= seen, (stage.name, set(stage.after) - seen)
        seen.add(stage.name)
    assert [s.name for s in STAGES][:3] == ["labels", "chips", "train"] and STAGES[-1].name == "report"
    assert len(seen) == len(STAGES) + 1  # names are unique


def test_stages_command_lists_the_stages_and_what_a_run_finished(tmp_path):
    from typer.testing import CliRunner

    from minemap.manifest import Manifest
    from minemap.pipeline import STAGES

    Manifest(tmp_path / "manifest.jsonl").mark("stage:labels", "k")
    res = CliRunner().invoke(cli.app, ["stages", str(tmp_path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    # a row's first line (a narrow terminal wraps long cells onto more lines)
    rows = [line.split("│") for line in res.output.splitlines() if line.startswith("│")]
    rows = [r for r in rows if r[1].strip()]
    assert [r[1].strip() for r in rows] == [s.name for s in STAGES]
    assert rows[0][-2].strip() == "yes" and rows[1][-2].strip() == ""
    res = CliRunner().invoke(cli.app, ["stages", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a run folder" in res.output


def test_a_run_without_reference_keys_its_export_as_before(tmp_path):
    """The evaluation is an optional input: without a reference the export's key holds None in its place (as
    the hand-chained keys did), so a run made before the stage list resumes without redoing its exports."""
    from minemap._io import stable_hash
    from minemap.config import RunConfig
    from minemap.formats.run import RunFolder
    from minemap.manifest import Manifest
    from minemap.pipeline import STAGE, _Run, _step

    cfg = RunConfig.model_validate({"imagery": str(tmp_path), "years": [2019], "out": str(tmp_path),
                                    "model": {"path": str(tmp_path)}, "export": {"formats": []}})
    r = _Run(cfg, RunFolder(tmp_path), Manifest(tmp_path / "manifest.jsonl"), None, False, False, True)
    r.keys["panel"] = "k-panel"
    _step(r, STAGE["evaluate"])
    _step(r, STAGE["export"])  # no formats: not run, but keyed for the report after it
    assert r.keys["evaluate"] is None
    assert r.keys["export"] == stable_hash(["export", "k-panel", None, cfg.export.model_dump(exclude={"report"})])
    assert r.skipped == [] and r.seconds == {}
