"""The command line's refusals: an option value the settings reject, a scheduler address that cannot be one, a
config without the table a command needs, a training state that names code: each one line on stderr, exit
code 2, no traceback, and no work done before it."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from minemap.cli import app


def _one_line(r, *parts):
    """The command failed with exit code 2 and one line holding every part."""
    text = r.output.strip()
    assert r.exit_code == 2, r.output
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for part in parts:
        assert part in text, (part, text)
    return text


@pytest.mark.parametrize("args, said", [
    (["vectorize", "p", "--years", "2019", "--out", "o", "--threshold", "0.5", "--min-area-m2", "-1"],
     "--min-area-m2: Input should be greater than or equal to 0"),
    (["vectorize", "p", "--years", "2019", "--out", "o", "--threshold", "0.5", "--simplify-m", "-2"],
     "--simplify-m: Input should be greater than or equal to 0"),
    (["postprocess", "p", "--years", "2019", "--out", "o.parquet", "--buffer-m", "-5"],
     "--buffer-m: Input should be greater than or equal to 0"),
    (["postprocess", "p", "--years", "2019", "--out", "o.parquet", "--temporal", "sometimes"],
     "--temporal: Input should be 'provisional', 'study' or 'off'"),
    (["chips", "--labels", "l.gpkg", "--imagery", "i", "--year", "2019", "--out", "o", "--chip-size", "8"],
     "--chip-size: Input should be greater than or equal to 32"),
    (["chips", "--labels", "l.gpkg", "--imagery", "i", "--year", "2019", "--out", "o", "--other-years", "20x0"],
     "--other-years '20x0': give years separated by commas"),
    (["train", "nowhere", "--out", "m", "--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
    (["train", "nowhere", "--out", "m", "--head", "unet"], "--head: Input should be 'segformer' or 'fine'"),
    (["predict", "--model", "m", "--imagery", "i", "--years", "2019", "--out", "o", "--tile-size", "10"],
     "--tile-size: Input should be greater than or equal to 64"),
    (["run", "--min-area-m2", "-1"], "--min-area-m2: Input should be greater than or equal to 0"),
    (["run", "--threshold", "1.5"], "--threshold: Input should be less than 1"),
    (["run", "--encoder", "mit-b9"], "--encoder: Input should be 'mit-b0', 'mit-b1'"),
    (["run", "--workers", "0"], "--workers: Input should be greater than or equal to 1"),
    (["run", "--tile-size", "8"], "--tile-size: Input should be greater than or equal to 64"),
    (["panel", "p.parquet", "--out", "o", "--max-gap", "-1"], "--max-gap: Input should be greater than or equal to 0"),
    (["panel", "p.parquet", "--out", "o", "--buffer-m", "-1"], "--buffer-m: Input should be greater than or equal to 0"),
    (["review", "export", "r", "--year", "2020", "--limit", "0"], "--limit 0: at least 1 item"),
])
def test_an_option_the_settings_reject_is_one_line_naming_it(tmp_path, monkeypatch, args, said):
    monkeypatch.chdir(tmp_path)
    _one_line(CliRunner().invoke(app, args), said)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", [
    ["run"], ["vectorize", "p", "--years", "2019", "--out", "o", "--threshold", "0.5"],
    ["predict", "--model", "m", "--imagery", "i", "--years", "2019", "--out", "o"]])
@pytest.mark.parametrize("address, said", [
    ("nowhere:::", "not a scheduler address; expected host:port, tcp://host:port"),
    ("tcp://host", "not a scheduler address"), ("http://host:8786", "not a scheduler address"),
    ("tcp://host:99999", "port 99999 is not one (1-65535)"), ("sched.json", "no scheduler file there")])
def test_a_scheduler_address_of_no_form_is_refused_at_once(tmp_path, monkeypatch, command, address, said):
    """Before: a 20 s connection attempt, then the Dask client's 40 s shutdown and a TimeoutError traceback."""
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    _one_line(CliRunner().invoke(app, [*command, "--scheduler", address]), f"--scheduler {address!r}: {said}")
    assert time.perf_counter() - t0 < 5


def test_a_scheduler_file_gives_its_address(scene, tmp_path, monkeypatch):
    """A scheduler file (JSON with the address, as `dask scheduler --scheduler-file` writes it) is read; its
    address, well-formed but not answering, keeps the connection time-out and ends in one line, before any
    work. A config's scheduler of no form names the config."""
    monkeypatch.setattr("minemap.execution.CONNECT_TIMEOUT_S", 2)
    (tmp_path / "sched.json").write_text(json.dumps({"type": "Scheduler", "address": "tcp://127.0.0.1:9"}))
    r = CliRunner().invoke(app, ["run", "--labels", str(scene.labels), "--imagery", str(scene.imagery),
                                 "--train-year", "2019", "--years", "2019", "--out", str(tmp_path / "o"),
                                 "--scheduler", str(tmp_path / "sched.json")])
    _one_line(r, "scheduler tcp://127.0.0.1:9: cannot be reached")
    assert not (tmp_path / "o" / "chips").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"address": "nowhere:::"}))
    _one_line(CliRunner().invoke(app, ["run", "--scheduler", str(tmp_path / "bad.json")]),
              "the scheduler file's address 'nowhere:::' is not one of host:port")
    (tmp_path / "notjson.json").write_text("tcp://127.0.0.1:9")
    _one_line(CliRunner().invoke(app, ["run", "--scheduler", str(tmp_path / "notjson.json")]),
              "not a Dask scheduler file")
    config = tmp_path / "run.toml"
    config.write_text('labels = ["l.gpkg"]\nimagery = "imagery"\ntrain_year = 2019\nyears = "2019"\nout = "o"\n'
                      'scheduler = "nowhere:::"\n')
    _one_line(CliRunner().invoke(app, ["run", str(config)]),
              f"{config}: scheduler 'nowhere:::': not a scheduler address")


def test_imagery_fetch_names_the_config_or_the_option(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('years = "2019"\n[vectorize]\nmin_area_m2 = 500\n')
    _one_line(CliRunner().invoke(app, ["imagery", "fetch", str(config), "--years", "2019"]),
              f"{config}: no [imagery] table")
    config.write_text('[imagery]\nsource = "stac"\nbbox = [-3.0, 6.0, -2.9, 6.1]\n')
    _one_line(CliRunner().invoke(app, ["imagery", "fetch", str(config), "--years", "2019"]),
              f"{config}: imagery: url: Field required")
    _one_line(CliRunner().invoke(app, ["imagery", "fetch", "--years", "2019", "--url", "http://127.0.0.1:9"]),
              "imagery: bbox: Field required (give --aoi)")
    _one_line(CliRunner().invoke(app, ["imagery", "fetch", str(config), "--years", "2019", "--url",
                                       "http://127.0.0.1:9", "--months", "13-14"]), "--months: ", "1-12")
    _one_line(CliRunner().invoke(app, ["imagery", "fetch", "--years", "2019", "--url", "http://127.0.0.1:9",
                                       "--aoi", "10,0,5,1"]), "--aoi: ", "west < east")


class _Shell:  # a training state that reduces to os.system
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_training_state_that_names_code_is_refused_and_never_run(scene, tmp_path):
    """`train --resume` reads out/train_state.pt as data (tensors, numbers, text): a state naming os.system is
    refused in one line naming it, and the command is not run (the same file run by a plain unpickler would)."""
    from minemap.chips import make_chips
    from minemap.config import ChipConfig
    from minemap.imagery import open_imagery
    from minemap.labels import read_labels

    labels, _ = read_labels([scene.labels])
    make_chips(labels, open_imagery(scene.imagery), 2019, tmp_path / "chips",
               ChipConfig(chip_size=64, stride=32, block_size=128, background_per_positive=0.3))
    from minemap.model import ModelCard, build_model, save_model

    # a model folder minemap wrote (an interrupted training's), whose state file someone replaced
    save_model(build_model("mit-b0", 4), ModelCard(encoder="mit-b0", bands=["red", "green", "blue", "nir"],
                                                   band_mean=[0.0] * 4, band_std=[1.0] * 4, gsd_m=4.77,
                                                   pixel_size=[4.77, 4.77], crs="EPSG:3857", chip_size=64),
               tmp_path / "model")
    marker = tmp_path / "ran"
    torch.save({"model": {}, "progress": {"epoch": 0, "key": None}, "augment_rng": _Shell(marker)},
               tmp_path / "model" / "train_state.pt")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "chips"), "--out", str(tmp_path / "model"), "--epochs", "1",
                                 "--resume", "--accept-weak-model"])
    _one_line(r, "train_state.pt: cannot resume from this training state (it names ", ".system, which is not plain "
                 "data: refused, never run)")
    assert not marker.exists()
