"""Shared fixtures: small synthetic scenes and rasters with known answers, written to temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from minemap.config import RunConfig
from minemap.synthetic import make_scene

# the cores shared between pytest-xdist's workers (`make test` runs one a core), not each worker taking them all;
# subprocesses the tests start take the same share
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(_THREADS)
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mining_polygons_literature_sample.gpkg"
YEARS = (2019, 2020, 2021)


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    """A 384 x 384 px scene, three years, 2 x 2 quads per year."""
    return make_scene(tmp_path_factory.mktemp("scene"), years=YEARS, size=384, n_mines=7, seed=3)


def tiny_config(scene, out: Path, **over) -> RunConfig:
    data = {
        "labels": [scene.labels], "imagery": scene.imagery, "train_year": 2019, "years": list(YEARS),
        "out": out, "reference": scene.truth,
        "chips": {"chip_size": 64, "stride": 32, "block_size": 128, "background_per_positive": 0.3},
        # a tiny scene's dozen chips: train.epoch_windows (128) would make every test's epochs 8 times longer
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "epoch_windows": 16},
        "predict": {"tile_size": 256},
        "vectorize": {"min_area_m2": 200},
        "accept_weak_model": True,  # two epochs are not meant to converge; the floor is tested on its own
    }
    data.update(over)
    return RunConfig.model_validate(data)


@pytest.fixture(scope="session")
def tiny_run(scene, tmp_path_factory):
    """The whole pipeline once on the small scene with a tiny, briefly trained model."""
    from minemap.pipeline import run

    cfg = tiny_config(scene, tmp_path_factory.mktemp("run") / "out")
    return cfg, run(cfg, progress=False)


def write_raster(path: Path, data: np.ndarray, transform: Affine, crs: str = "EPSG:3857", nodata=None,
                 descriptions: tuple[str, ...] | None = None) -> Path:
    data = data if data.ndim == 3 else data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = descriptions
    return path
