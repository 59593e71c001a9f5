"""Execution on a real dask.distributed LocalCluster on loopback: same outputs as serial, the model loaded once
per worker, dead workers' units run again, clear errors when a cluster is unreachable or units keep dying."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio

from minemap.errors import ExecutionError
from minemap.execution import map_units

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", TESTS)  # workers import the task functions of tests/units.py
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, memory_limit="2GiB")
        yield lc.scheduler_address
        lc.close()
    mp.undo()


def test_units_on_a_cluster_equal_serial_and_initialise_once_per_worker(cluster):
    import units

    work = [("x", i) for i in range(12)]
    serial = sorted(map_units(units.square, work, progress=False)), units.LOADED
    remote = sorted(map_units(units.square, work, initializer=units.load, initargs=(7,), progress=False,
                              scheduler=cluster))
    assert [(i, sq) for i, sq, _ in remote] == [(i, i * i) for i in range(12)] == [(i, s) for i, s, _ in serial[0]]
    assert {n for _, _, n in remote} == {1}  # each worker process ran the initializer exactly once


def test_a_dead_workers_unit_runs_again(cluster, tmp_path):
    import units

    out = sorted(map_units(units.die_once, [(str(tmp_path), i) for i in range(4)], progress=False,
                           scheduler=cluster))
    assert out == [0, 1, 4, 9] and (tmp_path / "died-1").exists()


def test_units_that_keep_killing_workers_fail_clearly(cluster):
    import units

    with pytest.raises(ExecutionError, match="workers died") as e:
        list(map_units(units.always_die, [("x", 0)], progress=False, scheduler=cluster))
    assert "\n" not in str(e.value)


def test_unreachable_scheduler(monkeypatch):
    monkeypatch.setattr("minemap.execution.CONNECT_TIMEOUT_S", 2)
    with pytest.raises(ExecutionError, match="cannot be reached"):
        list(map_units(abs, [1], progress=False, scheduler="tcp://127.0.0.1:9"))


def test_predict_on_a_cluster_equals_serial(cluster, scene, tmp_path):
    from test_predict import _pixel_model_dir
    from minemap.config import PredictConfig
    from minemap.predict import predict

    model_dir = _pixel_model_dir(scene, tmp_path)  # a real (untrained) mit-b0: workers load it from disk
    cfg = PredictConfig(tile_size=128)
    serial = predict(model_dir, scene.imagery, [2020], tmp_path / "serial", cfg, progress=False)
    remote = predict(model_dir, scene.imagery, [2020], tmp_path / "dask", cfg, progress=False, scheduler=cluster)
    assert len(serial) >= 4
    assert [p.relative_to(tmp_path / "serial") for p in serial] == [p.relative_to(tmp_path / "dask") for p in remote]
    for a, b in zip(serial, remote):
        # the same windows and weights; workers run torch on another number of threads (dask sets one), which
        # sums in another order, so a value may round to the neighbouring level of 1/250
        with rasterio.open(a) as x, rasterio.open(b) as y:
            p, q = x.read().astype(int), y.read().astype(int)
            assert x.transform == y.transform and np.abs(p - q).max() <= 1 and (p == q).mean() > 0.99
    assert json.loads((tmp_path / "dask" / "tiles.json").read_text()) == \
        json.loads((tmp_path / "serial" / "tiles.json").read_text())


def test_cli_unreachable_scheduler_exits_2(scene, tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from minemap.cli import app

    monkeypatch.setattr("minemap.execution.CONNECT_TIMEOUT_S", 2)
    res = CliRunner().invoke(app, ["run", "--labels", str(scene.labels), "--imagery", str(scene.imagery),
                                   "--train-year", "2019", "--years", "2019", "--out", str(tmp_path / "o"),
                                   "--scheduler", "tcp://127.0.0.1:9"])
    assert res.exit_code == 2 and "cannot be reached" in res.output
    assert not (tmp_path / "o" / "chips").exists()  # refused before any work


def test_every_run_option_has_help():
    import typer
    from minemap.cli import app

    run = typer.main.get_command(app).commands["run"]
    missing = [p.name for p in run.params if not getattr(p, "help", None)]
    assert not missing, missing


def test_vectorize_threshold_out_of_range_names_the_value(tmp_path):
    from typer.testing import CliRunner
    from minemap.cli import app

    res = CliRunner().invoke(app, ["vectorize", str(tmp_path), "--years", "2019", "--out", str(tmp_path / "p"),
                                   "--threshold", "1.5"])
    assert res.exit_code == 2 and "--threshold 1.5" in res.output and "between 0 and 1" in res.output


def test_corrupt_weights_stop_prediction_before_any_unit(scene, tmp_path, monkeypatch):
    from test_predict import _pixel_model_dir
    from minemap.errors import ModelError
    from minemap.predict import predict

    model_dir = _pixel_model_dir(scene, tmp_path)
    weights = model_dir / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    monkeypatch.setattr("minemap.predict.map_units", lambda *a, **k: pytest.fail("units were sent"))
    with pytest.raises(ModelError, match="corrupt weights"):
        predict(model_dir, scene.imagery, [2019], tmp_path / "probs", progress=False, scheduler="tcp://127.0.0.1:9")
    assert not (tmp_path / "probs" / "manifest.jsonl").exists()


def test_vectorize_tiles_on_a_cluster_equal_serial(cluster, tmp_path):
    from test_vectorize import _tiles
    from minemap.rasters import NODATA
    from minemap.vectorize import vectorize_year

    q = np.zeros((64, 64), np.uint8)
    q[10:40, 20:50] = 200  # a mine across the seam of the two tiles
    q[45:60, 2:12] = 180
    q[55:60, 55:60] = NODATA
    paths = _tiles(tmp_path, q)
    serial = vectorize_year(paths, 2020, 0.5)
    remote = vectorize_year(paths, 2020, 0.5, scheduler=cluster)
    assert len(serial) == 2 and serial.geometry.geom_equals_exact(remote.geometry, 1e-9).all()
    assert serial.drop(columns="geometry").equals(remote.drop(columns="geometry"))
