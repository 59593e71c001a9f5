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
def cluster(tmp_path_factory):
    from distributed import LocalCluster

    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", TESTS)  # workers import the task functions of tests/units.py
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        # workers start in a folder of their own, as on a real cluster: a relative path sent to them names
        # another place than the client's
        here = pytest.MonkeyPatch()
        here.chdir(tmp_path_factory.mktemp("workers"))
        try:
            lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None, memory_limit="2GiB")
        finally:
            here.undo()
        yield lc.scheduler_address
        lc.close()
    mp.undo()


def _worker_info(address: str, what) -> dict:
    """``what()`` on every worker of the cluster: {worker address: result}."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return client.run(what)


def _same_probabilities(a, b) -> None:
    """Two probability rasters alike: the same grid and values, but for a level of rounding where torch sums in
    another order (workers run another number of threads)."""
    with rasterio.open(a) as x, rasterio.open(b) as y:
        p, q = x.read().astype(int), y.read().astype(int)
        assert x.transform == y.transform and p.shape == q.shape, (a, b)
        assert np.abs(p - q).max() <= 1 and (p == q).mean() > 0.99, (a, b)


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


def test_a_malformed_address_from_the_python_api_is_refused_at_once(monkeypatch):
    """Not a connection attempt and the client's shutdown (a minute), but one line naming the address."""
    from minemap.errors import InputError
    from minemap.execution import connect

    monkeypatch.setattr("distributed.Client", lambda *a, **k: pytest.fail("a connection was tried"))
    for bad in ("localhost", "tcp://host:99999", "http://x:80"):
        with pytest.raises(InputError, match="scheduler"):
            connect(bad)


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
    from minemap.config import VectorizeConfig
    from minemap.formats.rasters import NODATA
    from minemap.vectorize import vectorize_year

    q = np.zeros((64, 64), np.uint8)
    q[10:40, 20:50] = 200  # a mine across the seam of the two tiles
    q[45:60, 2:12] = 180
    q[55:60, 55:60] = NODATA
    paths = _tiles(tmp_path, q)
    squares = VectorizeConfig(max_rectangularity=1)  # rectangular pits: shape does not decide here
    serial = vectorize_year(paths, 2020, 0.5, squares)
    remote = vectorize_year(paths, 2020, 0.5, squares, scheduler=cluster)
    assert len(serial) == 2 and serial.geometry.geom_equals_exact(remote.geometry, 1e-9).all()
    assert serial.drop(columns="geometry").equals(remote.drop(columns="geometry"))


def _half_areas(grid, tile_size: int):
    """Two areas of interest (EPSG:4326): the west and the east half of the grid's tile columns, a pixel inside
    their tiles, so that each takes its own tiles and no other."""
    import geopandas as gpd
    import shapely
    from minemap.grid import make_tiles

    tiles = make_tiles(grid, tile_size)
    cols = sorted({t.col_off for t in tiles})
    res = grid.transform.a
    halves = []
    for side in (cols[:len(cols) // 2], cols[len(cols) // 2:]):
        boxes = [shapely.box(*t.grid(grid).bounds) for t in tiles if t.col_off in side]
        area = shapely.union_all(boxes).buffer(-res, join_style="mitre")
        halves.append(gpd.GeoSeries([area], crs=grid.crs).to_crs(4326).iloc[0])
    return halves


def test_two_runs_at_once_on_one_cluster_keep_their_own_tiles(cluster, scene, tmp_path, monkeypatch):
    """The west and the east half of an area mapped at the same time on one cluster, with the same model and
    imagery, each into its own folder: each run gets its own tiles (Dask shares a result between clients that
    submit the same key), all on disk, in its manifest and counted in its tiles.json."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from test_predict import _pixel_model_dir
    from minemap import predict as pr
    from minemap.aoi import aoi_in
    from minemap.config import PredictConfig
    from minemap.grid import make_tiles
    from minemap.imagery import open_imagery
    from minemap.manifest import Manifest
    from minemap.predict import predict

    model_dir = _pixel_model_dir(scene, tmp_path)
    cfg = PredictConfig(tile_size=128, window_size=128)
    grid = open_imagery(scene.imagery).grid(2020)
    areas = dict(zip(("west", "east"), _half_areas(grid, 128)))
    expected = {name: {f"2020/{t.tile_id}" for t in make_tiles(grid, 128, aoi_in(a, grid.crs, grid.bounds))}
                for name, a in areas.items()}
    assert len(expected["west"]) == len(expected["east"]) >= 4 and not expected["west"] & expected["east"]
    serial = predict(model_dir, scene.imagery, [2020], tmp_path / "serial", cfg, progress=False)
    assert len(serial) == 2 * len(expected["west"])

    together = threading.Barrier(2)
    real = pr.map_units

    def at_once(*args, **kwargs):  # both runs submit their units at the same moment
        together.wait(timeout=120)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(pr, "map_units", at_once)
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(predict, model_dir, scene.imagery, [2020], tmp_path / name, cfg, progress=False,
                                  aoi=area, scheduler=cluster) for name, area in areas.items()}
        outs = {name: f.result(timeout=600) for name, f in runs.items()}
    for name, paths in outs.items():
        out = tmp_path / name
        on_disk = {f"2020/{p.stem}" for p in (out / "2020").glob("*.tif")}
        assert on_disk == expected[name] == {f"2020/{p.stem}" for p in paths}, name
        assert {k for k, _ in Manifest(out / "manifest.jsonl").items()} == expected[name], name
        assert json.loads((out / "tiles.json").read_text())["2020"]["predicted"] == len(expected[name])
        for p in paths:
            _same_probabilities(p, tmp_path / "serial" / "2020" / p.name)


def test_a_model_changed_in_place_is_reloaded_by_the_same_workers(cluster, scene, tmp_path):
    """Workers outlive runs and keep the model loaded: one retrained into the same folder, or whose card is
    edited, is loaded again (the cluster's tiles equal a serial run with the new model), not served from the
    old one while the manifest records the new one's fingerprint."""
    import os

    import torch
    from test_predict import _pixel_model_dir
    from minemap.config import PredictConfig
    from minemap.model import build_model, read_card, save_model
    from minemap.predict import predict

    model_dir = _pixel_model_dir(scene, tmp_path)
    cfg = PredictConfig(tile_size=192, window_size=128)
    pids = _worker_info(cluster, os.getpid)
    old = predict(model_dir, scene.imagery, [2020], tmp_path / "old", cfg, progress=False, scheduler=cluster)
    torch.manual_seed(11)  # retrained in place: other weights, the same folder
    retrained = build_model("mit-b0", 4)
    with torch.no_grad():
        retrained.decode_head.classifier.bias += 1.5  # far from the first model's outputs
    save_model(retrained, read_card(model_dir), model_dir)
    new = predict(model_dir, scene.imagery, [2020], tmp_path / "new", cfg, progress=False, scheduler=cluster)
    serial = predict(model_dir, scene.imagery, [2020], tmp_path / "serial", cfg, progress=False)
    for a, b in zip(new, serial, strict=True):
        _same_probabilities(a, b)
    changed = 0
    for a, b in zip(old, new, strict=True):
        with rasterio.open(a) as x, rasterio.open(b) as y:
            changed += int(np.abs(x.read().astype(int) - y.read().astype(int)).max() > 1)
    assert changed == len(new)  # the old model's tiles differ: the comparison above could tell them apart

    card = read_card(model_dir)  # only the card edited: a new calibration
    (model_dir / "model.json").write_text(card.model_copy(update={"calibration": {"scale": 3.0, "bias": -1.0}})
                                          .model_dump_json(indent=2) + "\n")
    recal = predict(model_dir, scene.imagery, [2020], tmp_path / "recal", cfg, progress=False, scheduler=cluster)
    serial = predict(model_dir, scene.imagery, [2020], tmp_path / "serial2", cfg, progress=False)
    for a, b, c in zip(recal, serial, new, strict=True):
        _same_probabilities(a, b)
        with rasterio.open(a) as x, rasterio.open(c) as y:
            assert np.abs(x.read().astype(int) - y.read().astype(int)).max() > 1
    assert _worker_info(cluster, os.getpid) == pids  # the very worker processes that held the old model


def test_relative_paths_reach_workers_in_another_folder(cluster, scene, tmp_path, monkeypatch):
    """Model, imagery and output given relative to the client's folder: workers, which run in folders of their
    own, read and write the same places (not 'imagery directory not found', nor tiles left in their folders)."""
    import os

    from test_predict import _pixel_model_dir
    from minemap.config import PredictConfig
    from minemap.predict import predict

    _pixel_model_dir(scene, tmp_path)
    (tmp_path / "imagery").symlink_to(scene.imagery, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    cwds = set(_worker_info(cluster, os.getcwd).values())
    assert str(tmp_path) not in cwds and not any((Path(c) / "imagery").exists() for c in cwds)
    cfg = PredictConfig(tile_size=192, window_size=128)
    remote = predict("model", "imagery", [2020], "out", cfg, progress=False, scheduler=cluster)
    serial = predict("model", "imagery", [2020], "serial", cfg, progress=False)
    assert len(remote) == len(serial) >= 4
    for a, b in zip(remote, serial, strict=True):
        assert a.is_absolute() and a.is_relative_to(tmp_path / "out") and a.name == b.name
        _same_probabilities(a, b)
    assert not any((Path(c) / "out").exists() for c in cwds)  # nothing written where the workers run


def test_a_run_with_relative_paths_on_a_cluster(cluster, scene, tmp_path, monkeypatch):
    """``minemap run`` with a relative imagery, model and run folder on a cluster whose workers run elsewhere:
    prediction and vectorisation on the workers find the imagery and the tiles, and write into the run."""
    import os

    from test_predict import _pixel_model_dir
    from minemap.config import RunConfig
    from minemap.pipeline import run

    _pixel_model_dir(scene, tmp_path)
    (tmp_path / "imagery").symlink_to(scene.imagery, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    cwds = set(_worker_info(cluster, os.getcwd).values())
    assert str(tmp_path) not in cwds
    cfg = RunConfig.model_validate({"imagery": "imagery", "out": "run", "model": {"path": "model"}, "years": [2020],
                                    "predict": {"tile_size": 192, "window_size": 128}, "accept_weak_model": True,
                                    "export": {"report": False}, "scheduler": cluster})
    result = run(cfg, progress=False)
    assert result.out == tmp_path / "run" and (tmp_path / "run" / "panel.parquet").is_file()
    assert len(list((tmp_path / "run" / "probabilities" / "2020").glob("*.tif"))) >= 4
    assert not any((Path(c) / "run").exists() for c in cwds)


def test_a_units_error_on_a_worker_comes_back_as_it_was(cluster, tmp_path):
    """A user's error raised on a worker (here over a rasterio error, whose chain Dask cannot bring back) reaches
    the client as the same one-line error, not as a bare Exception."""
    from minemap.errors import InputError
    from minemap.vectorize import _tile_unit

    with pytest.raises(InputError, match="cannot read probability raster") as e:
        list(map_units(_tile_unit, [(0, str(tmp_path / "missing.tif"), 100, None, None)], progress=False,
                       scheduler=cluster))
    assert "\n" not in str(e.value)
