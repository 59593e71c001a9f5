"""A run killed with SIGKILL during prediction resumes: the rerun does only the rest, and its outputs equal an
uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import rasterio

from minemap.grid import make_tiles
from minemap.imagery import open_imagery
from minemap.manifest import Manifest


def _predict_cmd(model_dir, scene, out):
    return [sys.executable, "-m", "minemap", "predict", "--model", str(model_dir), "--imagery", str(scene.imagery),
            "--years", "2019-2020", "--out", str(out), "--tile-size", "64", "--window-size", "64"]


def test_sigkill_during_prediction_then_resume(scene, tmp_path):
    from test_predict import _pixel_model_dir

    model_dir = _pixel_model_dir(scene, tmp_path)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_predict_cmd(model_dir, scene, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prediction ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {k for k, _ in Manifest(log).items()}
    units = 2 * len(make_tiles(open_imagery(scene.imagery).grid(2019), 64))
    assert 6 <= len(finished) < units  # killed part-way
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif") if f"{p.parent.name}/{p.stem}" in finished}

    subprocess.run(_predict_cmd(model_dir, scene, out), env=env, check=True, capture_output=True)
    # the units finished before the kill were not done again
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    done = Manifest(log)
    assert len(done) > len(finished)

    whole = tmp_path / "whole"
    subprocess.run(_predict_cmd(model_dir, scene, whole), env=env, check=True, capture_output=True)
    names = sorted(p.relative_to(whole) for p in whole.rglob("*.tif"))
    assert names == sorted(p.relative_to(out) for p in out.rglob("*.tif")) and len(names) == len(done) == units
    for rel in names:
        with rasterio.open(out / rel) as a, rasterio.open(whole / rel) as b:
            assert np.array_equal(a.read(), b.read()), rel


def test_relative_paths_resume_from_another_folder(scene, tmp_path, monkeypatch):
    """Paths are made absolute before units are built, and fingerprints do not hold them: a prediction started
    with relative paths resumes (nothing redone) when run again from elsewhere with absolute ones."""
    from test_predict import _pixel_model_dir
    from minemap.config import PredictConfig
    from minemap.predict import predict

    _pixel_model_dir(scene, tmp_path)
    (tmp_path / "imagery").symlink_to(scene.imagery, target_is_directory=True)
    cfg = PredictConfig(tile_size=192, window_size=128)
    monkeypatch.chdir(tmp_path)
    first = predict("model", "imagery", [2019], "out", cfg, progress=False)
    assert first and all(p.is_absolute() and p.is_relative_to(tmp_path / "out") for p in first)
    stamps = {p: p.stat().st_mtime_ns for p in first}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = predict(tmp_path / "model", tmp_path / "imagery", [2019], tmp_path / "out", cfg, progress=False)
    assert again == first and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert not any(elsewhere.iterdir())
