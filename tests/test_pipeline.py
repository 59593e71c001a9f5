"""The whole pipeline through the Python API and the CLI, resuming, and bad inputs as a user meets them."""

import json
import os
import re
import shutil
import subprocess
import sys

import geopandas as gpd
import pandas as pd
import pytest
from typer.testing import CliRunner

from minemap.cli import app
from minemap.pipeline import run
from minemap.formats.run import STATE

from conftest import YEARS, tiny_config

runner = CliRunner()


def test_run_outputs_and_schemas(tiny_run):
    cfg, res = tiny_run
    out = cfg.out
    panel = gpd.read_parquet(out / "panel.parquet")
    from minemap.formats.panel import CHANGE_COLUMNS, EVENT_COLUMNS, LINEAGE_COLUMNS, PANEL_COLUMNS

    assert list(panel.columns) == PANEL_COLUMNS
    assert panel.crs.to_epsg() == 4326 and panel.geometry.is_valid.all()
    assert panel.groupby(["mine_id", "year"]).size().max() == 1
    mines = pd.read_parquet(out / "mines.parquet")
    assert list(mines.columns) == LINEAGE_COLUMNS and set(mines.mine_id) == set(panel.mine_id)
    assert list(pd.read_csv(out / "events.csv").columns) == EVENT_COLUMNS
    changes = pd.read_csv(out / "changes.csv")
    assert list(changes.columns) == CHANGE_COLUMNS and set(changes.year) == set(panel.year)
    assert set(panel.iso3.dropna()) <= {"GHA"}
    summary = pd.read_csv(out / "summary.csv")
    assert summary.area_km2.sum() == pytest.approx(panel.area_km2.sum(), abs=1e-5 * len(summary))
    assert (out / "model" / "weights.safetensors").is_file() and (out / "model" / "model.json").is_file()
    # training saw the training blocks in the two years after the labels' too (chips.other_years = 2)
    shown = pd.read_parquet(out / "chips" / "other_years.parquet")
    assert set(shown.year) == {2020, 2021} and "imagery of 2020, 2021" in \
        json.loads((out / "model" / "model.json").read_text())["selection"]["training"]
    assert "the same blocks also from the imagery of 2020, 2021" in (out / "DATASET.md").read_text()
    # and chose its epoch on the labels' year's validation blocks (train.validation_years), as the card says
    assert "- Validation: blocks, wall to wall.\n" in (out / "DATASET.md").read_text()
    from minemap.grid import make_tiles
    from minemap.imagery import open_imagery

    for y in YEARS:  # the tiles of the global grid over the scene (not 2 x 2 from its corner)
        tiles = make_tiles(open_imagery(cfg.imagery).grid(y), cfg.predict.tile_size)
        assert sorted(p.stem for p in (out / "probabilities" / str(y)).glob("*.tif")) == \
            sorted(t.tile_id for t in tiles)
        assert (out / "polygons" / f"{y}.parquet").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["years"]) == {str(y) for y in YEARS}
    assert 0 <= metrics["overall"]["pixel"]["f1"] <= 1
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_rerun_skips_finished_stages_and_overwrite_redoes(tiny_run):
    cfg, _ = tiny_run
    stamp = os.stat(cfg.out / "panel.parquet").st_mtime_ns
    res = run(cfg, progress=False)
    assert res.skipped == ["labels", "chips", "train", "hard_negatives", "finetune", "predict", "vectorize",
                           "postprocess", "panel", "evaluate", "export", "report"]
    assert os.stat(cfg.out / "panel.parquet").st_mtime_ns == stamp
    # a changed setting redoes that stage and those after it, not those before
    res = run(cfg.model_copy(update={"vectorize": cfg.vectorize.model_copy(update={"min_area_m2": 5000})}),
              progress=False)
    assert res.skipped == ["labels", "chips", "train", "hard_negatives", "finetune", "predict"]


def test_interrupted_training_resumes(scene, tmp_path, monkeypatch, caplog):
    import logging

    import minemap.train as train_mod

    cfg = tiny_config(scene, tmp_path / "out", train={"epochs": 3, "batch_size": 8, "learning_rate": 1e-3,
                                                              "epoch_windows": 16})
    real = train_mod._save_state
    calls = []

    def crash_after_two(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_state", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    assert (cfg.out / "model_initial" / STATE).is_file() and not (cfg.out / "panel.parquet").exists()
    monkeypatch.setattr(train_mod, "_save_state", real)
    with caplog.at_level(logging.INFO, logger="minemap"):
        res = run(cfg, progress=False)
    assert "resuming at epoch 3" in caplog.text
    assert res.skipped == ["labels", "chips"] and (cfg.out / "panel.parquet").is_file()


def test_cli_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("labels", "chips", "train", "predict", "vectorize", "postprocess", "panel", "evaluate", "run",
                "demo"):
        assert re.search(rf"│ {cmd}\s", result.output), cmd


def test_cli_run_exact_form(scene, tmp_path):
    """The documented form, as a user types it, in a real subprocess with default settings."""
    out = tmp_path / "OUT"
    cmd = [sys.executable, "-m", "minemap", "run", "--labels", str(scene.labels), "--imagery", str(scene.imagery),
           "--train-year", "2019", "--years", "2019-2021", "--out", str(out), "--epochs", "1",
           "--chip-size", "64"]  # the scene is 384 px: 256 px chips would leave too few blocks to split
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("panel.parquet", "panel.gpkg", "summary.csv", "model/model.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "probabilities").glob("*/*.tif"))) == 3
    assert "panel" in proc.stdout and not (out / "metrics.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "up to date, not redone" in again.stdout


def test_cli_stages_one_by_one(tiny_run, tmp_path):
    cfg, _ = tiny_run
    out = cfg.out
    r = runner.invoke(app, ["labels", str(cfg.labels[0]), "--out", str(tmp_path / "labels.parquet")])
    assert r.exit_code == 0 and (tmp_path / "labels.parquet").is_file()
    r = runner.invoke(app, ["vectorize", str(out / "probabilities"), "--years", "2019-2021", "--model",
                            str(out / "model"), "--out", str(tmp_path / "polys")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["postprocess", str(tmp_path / "polys"), "--years", "2019-2021", "--buffer-m", "10",
                            "--out", str(tmp_path / "pp.parquet")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["panel", str(tmp_path / "pp.parquet"), "--out", str(tmp_path / "panel")])
    assert r.exit_code == 0 and (tmp_path / "panel" / "mines.csv").is_file()
    r = runner.invoke(app, ["export", str(tmp_path / "panel"), "--out", str(tmp_path / "export"), "--formats",
                            "gpkg,card"])
    assert r.exit_code == 0 and (tmp_path / "export" / "panel.gpkg").is_file(), r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "panel" / "panel.parquet"), "--reference", str(cfg.reference),
                            "--probabilities", str(out / "probabilities"), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0 and json.loads((tmp_path / "m.json").read_text())["years"]


def _fails_cleanly(args, pattern, out_dir=None):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in r.output
    if out_dir is not None:
        assert not (out_dir / "panel.parquet").exists() and not (out_dir / "chips").exists()


def _args(scene, out, labels=None, imagery=None, extra=()):
    return ["run", "--labels", str(labels or scene.labels), "--imagery", str(imagery or scene.imagery),
            "--train-year", "2019", "--years", "2019-2021", "--out", str(out), *extra]


def test_cli_bad_inputs(scene, tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(_args(scene, out, labels=tmp_path / "nope.gpkg"), r"nope.gpkg: file not found", out)
    (tmp_path / "empty.gpkg").write_bytes(b"")
    _fails_cleanly(_args(scene, out, labels=tmp_path / "empty.gpkg"), r"empty.gpkg: file is empty", out)
    gpd.read_file(scene.labels).set_crs(None, allow_override=True).to_file(tmp_path / "nocrs.shp")
    _fails_cleanly(_args(scene, out, labels=tmp_path / "nocrs.shp"), r"nocrs.shp: has no CRS", out)
    far = gpd.read_file(scene.labels)
    far["geometry"] = far.geometry.translate(20, 20)
    far.to_file(tmp_path / "far.gpkg")
    _fails_cleanly(_args(scene, out, labels=tmp_path / "far.gpkg"), r"far.gpkg: none of the \d+ labels lies within",
                   out)
    _fails_cleanly(["run", "--labels", str(scene.labels), "--imagery", str(scene.imagery), "--train-year", "2019",
                    "--years", "2019-2023", "--out", str(out)], r"no imagery for year\(s\) 2022, 2023", out)
    _fails_cleanly(_args(scene, out, extra=["--bands", "red,green,blue"]), r"has 4 bands but the config names 3", out)
    bad = tmp_path / "imagery"
    shutil.copytree(scene.imagery, bad)
    (bad / "2020" / "quad_0_0.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    _fails_cleanly(_args(scene, out, imagery=bad), r"quad_0_0.tif: not a readable raster", out)
    (tmp_path / "run.toml").write_text("this is = not toml [")
    _fails_cleanly(["run", str(tmp_path / "run.toml")], r"run.toml: not a valid TOML file")
    _fails_cleanly(["run", str(tmp_path / "missing.toml")], r"missing.toml: config file not found")
    _fails_cleanly(["train", str(tmp_path), "--out", str(tmp_path / "m")], r"not a chips folder")
    _fails_cleanly(["predict", "--model", str(tmp_path / "nomodel"), "--imagery", str(scene.imagery), "--years",
                    "2019", "--out", str(tmp_path / "p")], r"nomodel: model directory not found")
    _fails_cleanly(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--pretrained", "nvidia/mit-b0"],
                   r"not a chips folder")


def test_weak_model_stops_the_run_unless_accepted(tiny_run, tmp_path):
    """The floor judges the model without retraining it: a rerun with --accept-weak-model goes on from there. (The
    tiny scene's validation holds a few hundred labelled pixels, too few to judge by under the default
    train.min_val_pixels, so that bound is lifted here: a copy of the run trains its first fit again.)"""
    import shutil

    import tomli_w

    cfg, _ = tiny_run
    work = tmp_path / "out"
    shutil.copytree(cfg.out, work)
    data = json.loads(cfg.model_dump_json(exclude_none=True))
    data["out"] = str(work)
    data["accept_weak_model"] = False
    data["train"]["min_val_f1"] = 0.999
    data["train"]["min_val_pixels"] = 0
    (tmp_path / "run.toml").write_text(tomli_w.dumps(data))
    r = runner.invoke(app, ["run", str(tmp_path / "run.toml")])  # trains the first fit (its progress shown), stops
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    card = json.loads((work / "model_initial" / "model.json").read_text())  # the first fit is judged first
    floor = (rf"model_initial/model.json: validation F1 {card['val_metrics']['f1']:.3f} is below the floor 1.00 .* "
             r"--accept-weak-model")
    assert re.search(floor, r.output.strip().splitlines()[-1])
    _fails_cleanly(["run", str(tmp_path / "run.toml")], floor)  # judged again, not retrained: one line
    r = runner.invoke(app, ["run", str(tmp_path / "run.toml"), "--accept-weak-model"])
    assert r.exit_code == 0, r.output
    skipped = next(ln for ln in r.output.splitlines() if "up to date, not redone:" in ln)
    assert skipped.split("not redone:")[1].split() == ["labels,", "chips,", "train"]  # the first fit is not redone


def test_map_with_a_trained_model(tiny_run, scene, tmp_path):
    """``--model DIR``: no labels, chips or training; the same probabilities as the run that trained it; imagery
    at another pixel size is refused with the figure, and read at the model's pixel size with --resample."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling

    cfg, _ = tiny_run
    model = cfg.out / "model"
    out = tmp_path / "mapped"
    args = ["run", "--imagery", str(scene.imagery), "--years", "2020-2021", "--out", str(out), "--model", str(model),
            "--tile-size", "256", "--min-area-m2", "200", "--accept-weak-model"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "panel.parquet").is_file() and not (out / "chips").exists() and not (out / "model").exists()
    for tile in (cfg.out / "probabilities" / "2021").glob("*.tif"):
        with rasterio.open(tile) as a, rasterio.open(out / "probabilities" / "2021" / tile.name) as b:
            assert np.array_equal(a.read(), b.read()), tile.name
    assert json.loads((out / "probabilities" / "imagery.json").read_text())["resampled"] is None
    assert "up to date, not redone: predict" in runner.invoke(app, args).output
    # nothing found anywhere (every outline below the minimum area) is a result, not an error: no report
    empty = tmp_path / "empty"
    r = runner.invoke(app, [*args[:6], str(empty), *args[7:11], "--min-area-m2", "1e12", "--accept-weak-model"])
    assert r.exit_code == 0, r.output
    assert len(gpd.read_parquet(empty / "panel.parquet")) == 0 and not (empty / "report.html").exists()
    # the same ground at twice the pixel size
    coarse = tmp_path / "coarse"
    for f in scene.imagery.rglob("*.tif"):
        dest = coarse / f.relative_to(scene.imagery)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(f) as src:
            profile = src.profile | {"width": src.width // 2, "height": src.height // 2,
                                     "transform": src.transform * src.transform.scale(2)}
            data = src.read(out_shape=(src.count, src.height // 2, src.width // 2), resampling=Resampling.average)
            with rasterio.open(dest, "w", **profile) as dst:
                dst.write(data)
                dst.descriptions = src.descriptions
    bad = [a if a != str(scene.imagery) else str(coarse) for a in args]
    bad[bad.index(str(out))] = str(tmp_path / "coarse_out")
    _fails_cleanly(bad, r"coarse: imagery of 20\d\d has a ground sample distance of 9.\d\d m, the model was trained "
                        r"at 4.\d\d m .*predict.resample", tmp_path / "coarse_out")
    r = runner.invoke(app, bad + ["--resample"])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "coarse_out" / "probabilities" / "imagery.json").read_text())
    assert record["resampled"]["factor"] == pytest.approx(0.5, abs=0.01) and record["resampled"]["method"] == "bilinear"
    with rasterio.open(next((tmp_path / "coarse_out" / "probabilities" / "2021").glob("*.tif"))) as src:
        assert src.res[0] == pytest.approx(model_res(model), rel=0.02)


def model_res(model_dir):
    return json.loads((model_dir / "model.json").read_text())["pixel_size"][0]


def test_a_run_shows_training_only_years_it_maps(scene, tmp_path):
    """chips.other_years as a number counts the years the run maps (a remote source offers every year); a list is
    taken as given."""
    from minemap.pipeline import _shown_years

    assert _shown_years(tiny_config(scene, tmp_path / "o")) == [2020, 2021]
    assert _shown_years(tiny_config(scene, tmp_path / "o", years=[2019, 2020])) == [2020]
    assert _shown_years(tiny_config(scene, tmp_path / "o", years=[2019])) == []
    listed = tiny_config(scene, tmp_path / "o", years=[2019])
    listed.chips.other_years = [2021]
    assert _shown_years(listed) == [2021]
