import geopandas as gpd
import numpy as np

from minemap.geo import area_km2
from minemap.imagery import open_imagery
from minemap.synthetic import NICFI_RES_M


def test_scene_has_known_truth(scene):
    src = open_imagery(scene.imagery)
    assert src.years() == [2019, 2020, 2021] and src.band_names == ["red", "green", "blue", "nir"]
    assert len(list((scene.imagery / "2019").glob("*.tif"))) == 4
    g = src.grid(2019)
    assert g.crs.to_epsg() == 3857 and g.res == (NICFI_RES_M, NICFI_RES_M) and g.width == 384
    truth = gpd.read_file(scene.truth)
    per_year = truth.groupby("year").mine.apply(set)
    assert per_year[2020] - per_year[2019] and per_year[2020] - per_year[2021]  # mines appear and vanish
    grow = truth[truth.mine.isin(per_year[2019] & per_year[2021])]
    a = grow.assign(a=area_km2(grow.geometry.values)).pivot_table(index="mine", columns="year", values="a")
    assert (a[2021] >= a[2019] * 0.999).all()
    labels = gpd.read_file(scene.labels)
    assert len(labels) == len(per_year[2019]) - 1  # one mine missing from the noisy labels
    # haze lifts the dark forest pixels of the last year
    clear, _ = src.read(2019, g)
    hazy, _ = src.read(2021, g)
    assert np.percentile(hazy[0], 5) > 1.5 * np.percentile(clear[0], 5)
    assert np.all(clear >= 1)
