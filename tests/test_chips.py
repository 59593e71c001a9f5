import json

import geopandas as gpd
import pandas as pd
import numpy as np
import pytest
import rasterio
import shapely
import shapely.affinity
from affine import Affine
from rasterio.features import rasterize
from scipy.ndimage import binary_dilation
from pyproj import CRS
from shapely.geometry import Polygon, box

from minemap.chips import make_chips
from minemap.config import ChipConfig
from minemap.errors import InputError
from minemap.imagery import open_imagery

from conftest import write_raster

RES = 4.0
T = Affine(RES, 0, 0.0, 0, -RES, 0.0)  # EPSG:3857 at the equator: origin (0, 0), 4 m pixels


def _scene(tmp_path, size=256):
    data = np.full((4, size, size), 1000, np.uint16)
    write_raster(tmp_path / "img" / "2019" / "a.tif", data, T, descriptions=("red", "green", "blue", "nir"))
    return open_imagery(tmp_path / "img")


def _label_px(x0, y0, x1, y1, hole=None):
    """A polygon in pixel coordinates -> EPSG:3857 coordinates of grid T."""
    def to_xy(px, py):
        return T @ (px, py)
    shell = [to_xy(*p) for p in box(x0, y0, x1, y1).exterior.coords]
    holes = [[to_xy(*p) for p in box(*hole).exterior.coords]] if hole else []
    return Polygon(shell, holes)


def test_mask_is_rasterised_exactly_with_holes(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[_label_px(10, 20, 50, 60, hole=(20, 30, 30, 40))], crs="EPSG:3857")
    cfg = ChipConfig(chip_size=64, stride=64, block_size=66, background_per_positive=0, val_fraction=0,
                     test_fraction=0, ignore_border_m=0)
    index = make_chips(lab, src, 2019, tmp_path / "chips", cfg)
    first = index[index.chip_id == "2019_000001_000001"].iloc[0]
    with rasterio.open(tmp_path / "chips" / first["mask"]) as m, rasterio.open(tmp_path / "chips" / first.image) as im:
        mask = m.read(1)
        assert im.res == (RES, RES) and im.count == 4 and im.descriptions == ("red", "green", "blue", "nir")
        assert im.transform == T @ Affine.translation(1, 1)
    expected = np.zeros((64, 64), np.uint8)
    expected[19:59, 9:49] = 1  # label pixels 10..49 x 20..59, chip origin at pixel (1, 1)
    expected[29:39, 19:29] = 0  # the hole
    assert np.array_equal(mask, expected)
    assert first.positive_fraction == pytest.approx(expected.mean())


def test_splits_never_overlap_or_touch(tmp_path):
    src = _scene(tmp_path, size=512)
    rng = np.random.default_rng(1)
    polys = [_label_px(x, y, x + 20, y + 20) for x, y in rng.integers(0, 480, (25, 2))]
    lab = gpd.GeoDataFrame(geometry=polys, crs="EPSG:3857")
    cfg = ChipConfig(chip_size=32, stride=16, block_size=96, background_per_positive=1.0, val_fraction=0.2,
                     test_fraction=0.2, seed=4)
    index = make_chips(lab, src, 2019, tmp_path / "chips", cfg).to_crs("EPSG:3857")
    assert set(index.split) == {"train", "val", "test"}
    assert (index[index.split != "train"].positive_fraction > 0).any()
    geoms = np.asarray(index.geometry.values)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")  # intersects includes touching
    split = index.split.to_numpy()
    assert np.all(split[a] == split[b])
    # positives and background both present, and chips are inside one block each
    assert (index.positive_fraction > 0).sum() > 0 and (index.positive_fraction == 0).sum() > 0
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    assert meta["chip_size"] == 32 and meta["bands"] == ["red", "green", "blue", "nir"]
    assert meta["gsd_m"] == pytest.approx(RES, rel=1e-3)  # at the equator Web Mercator metres are ground metres


def test_ignore_band_along_label_outlines(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[_label_px(10, 20, 50, 60)], crs="EPSG:3857")
    # 8 m wide at 4 m pixels: pixel centres within 1 px of the outline, on both sides, are ignored
    cfg = ChipConfig(chip_size=64, stride=64, block_size=66, background_per_positive=0, val_fraction=0,
                     test_fraction=0, ignore_border_m=8.0)
    index = make_chips(lab, src, 2019, tmp_path / "chips", cfg)
    with rasterio.open(tmp_path / "chips" / index.iloc[0]["mask"]) as m:
        mask = m.read(1)
    expected = np.zeros((64, 64), np.uint8)
    expected[18:60, 8:50] = 255  # outline at chip rows 19 and 59, columns 9 and 49
    expected[20:58, 10:48] = 1
    assert np.array_equal(mask, expected)
    assert index.iloc[0].positive_pixels == 38 * 38


def _blob_labels(rng, n, size, r_px=(6, 30)):
    polys = []
    for x, y, r in zip(*rng.uniform(40, size - 40, (2, n)), rng.uniform(*r_px, n)):
        polys.append(shapely.Point(*(T @ (x, y))).buffer(r * RES, quad_segs=8))
    return gpd.GeoDataFrame(geometry=polys, crs="EPSG:3857")


def test_splits_share_labelled_pixels_for_any_seed():
    """Small scenes with a dozen mines: whatever the seeds, train gets 60-80 % of the labelled pixels and the
    largest share, val and test get some."""
    from minemap.chips.splits import assign_splits, choose_block_size
    from minemap.lattice import Grid

    grid = Grid(CRS.from_epsg(3857), T, 768, 768)
    shares = []
    for seed in range(40):
        lab = _blob_labels(np.random.default_rng(seed), 12, 768)
        cfg = ChipConfig(chip_size=64, seed=seed)
        block, weights, _, _ = choose_block_size(grid, np.asarray(lab.geometry.values), cfg)
        splits = assign_splits(weights, [], cfg)
        total = sum(weights.values())
        share = {s: sum(w for b, w in weights.items() if splits[b] == s) / total for s in ("train", "val", "test")}
        shares.append(share["train"])
        assert share["train"] > max(share["val"], share["test"]) and min(share.values()) > 0, (seed, share)
    assert 0.6 <= min(shares) and max(shares) <= 0.8, shares


def test_chips_record_split_shares(tmp_path):
    src = _scene(tmp_path, size=512)
    lab = _blob_labels(np.random.default_rng(7), 10, 512)
    index = make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=64, seed=5))
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    assert meta["block_size_from"] == "labels" and meta["blocks_with_labels"] >= 8
    splits = meta["splits"]
    assert {s: v["chips"] for s, v in splits.items()} == index.split.value_counts().to_dict()
    total = sum(v["positive_pixels"] for v in splits.values())
    assert total == index.positive_pixels.sum() > 0
    assert 0.55 <= splits["train"]["positive_pixels"] / total <= 0.85
    assert all(v["positive_chips"] > 0 for v in splits.values())
    assert set(index.kind) == {"positive", "background"}


def test_background_covers_rare_surfaces(tmp_path):
    """A bright surface on a few per cent of the scene still gets background chips: draws are spread over
    groups of similar spectra, not proportional to area."""
    size = 512
    data = np.full((4, size, size), 1000, np.uint16)
    data[:, 448:, 448:] = 5000  # one bright corner, 1.5 % of the scene
    write_raster(tmp_path / "img" / "2019" / "a.tif", data, T, descriptions=("red", "green", "blue", "nir"))
    lab = _blob_labels(np.random.default_rng(2), 10, 400)
    cfg = ChipConfig(chip_size=32, block_size=128, background_per_positive=0.2, val_fraction=0.2,
                     test_fraction=0.2, seed=1)
    index = make_chips(lab, open_imagery(tmp_path / "img"), 2019, tmp_path / "chips", cfg).to_crs("EPSG:3857")
    bg = index[index.kind == "background"]
    corner = shapely.box(*(T @ (440, size)), *(T @ (size, 440)))
    assert len(bg) >= 4 and shapely.intersects(np.asarray(bg.geometry.values), corner).sum() >= 1


def test_labels_too_clustered_to_split(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[_label_px(10, 10, 30, 30)], crs="EPSG:3857")
    with pytest.raises(InputError, match=r"labels.gpkg: the 1 labels fall in 1 block\(s\) of 66 px .* too few to "
                                         r"split .* chips.val_fraction"):
        make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=64), labels_path=tmp_path / "labels.gpkg")
    assert not (tmp_path / "chips").exists()


def test_no_imagery_under_the_labels(tmp_path):
    data = np.full((4, 256, 256), 1000, np.uint16)
    data[:, :, :128] = 0  # nodata where the labels are
    write_raster(tmp_path / "img" / "2019" / "a.tif", data, T, nodata=0, descriptions=("red", "green", "blue", "nir"))
    lab = gpd.GeoDataFrame(geometry=[_label_px(x, y, x + 10, y + 10) for x in (5, 40, 80) for y in (5, 80, 160)],
                           crs="EPSG:3857")
    with pytest.raises(InputError, match="labels.gpkg: no chip of the 2019 imagery under the labels has enough valid pixels"):
        make_chips(lab, open_imagery(tmp_path / "img"), 2019, tmp_path / "chips",
                   ChipConfig(chip_size=32, background_per_positive=0), labels_path=tmp_path / "labels.gpkg")
    assert not (tmp_path / "chips").exists()


def test_labels_missing_the_imagery(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[box(10, 10, 11, 11)], crs="EPSG:4326")
    with pytest.raises(InputError, match=r"labels.gpkg: none of the 1 labels lies within the 2019 imagery"):
        make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=64), labels_path=tmp_path / "labels.gpkg")
    assert not (tmp_path / "chips").exists()


def test_chip_larger_than_block_is_refused(tmp_path):
    src = _scene(tmp_path)
    lab = gpd.GeoDataFrame(geometry=[_label_px(10, 10, 20, 20)], crs="EPSG:3857")
    with pytest.raises(InputError, match="block_size 64 must exceed chip_size 64"):
        make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=64, block_size=64))


def _six_mines_chipped(tmp_path):
    """A 512 px scene with six 20 px labels, chipped into 128 px blocks: source, labels and chip settings."""
    src = _scene(tmp_path, size=512)
    lab = gpd.GeoDataFrame(geometry=[_label_px(x, y, x + 20, y + 20) for x, y in
                                     [(20, 20), (150, 30), (300, 40), (40, 300), (200, 200), (420, 420)]],
                           crs="EPSG:3857")
    cfg = ChipConfig(chip_size=32, block_size=128, background_per_positive=0, seed=3, ignore_border_m=0)
    make_chips(lab, src, 2019, tmp_path / "chips", cfg)
    return src, lab, cfg


def test_hard_negatives_teach_false_alarms_and_spare_likely_mines(tmp_path):
    from minemap.chips import hard_negative_chips
    from minemap.config import HardNegativeConfig

    src, lab, cfg = _six_mines_chipped(tmp_path)
    det = gpd.GeoDataFrame({"mean_probability": [0.6, 0.97, 0.9]}, geometry=[
        _label_px(100, 400, 110, 410),  # far from every label, unsure: a false alarm to learn from
        _label_px(400, 100, 412, 112),  # far, as sure as on labelled mines: maybe a mine the labels miss
        _label_px(205, 205, 228, 215),  # on a label and just beyond it: the mine, or its growth
    ], crs="EPSG:3857").to_crs("EPSG:4326")
    hn = HardNegativeConfig(buffer_m=40.0, per_positive=1.0)
    hard = hard_negative_chips(det, lab.to_crs("EPSG:4326"), src, tmp_path / "chips", tmp_path / "hard", cfg, hn)
    meta = json.loads((tmp_path / "hard" / "meta.json").read_text())
    counts = {k: meta["hard_negatives"][k] for k in ("detections", "false_alarms",
                                                     "ignored_as_possible_missed_mines", "chips")}
    assert counts == {"detections": 3, "false_alarms": 1, "ignored_as_possible_missed_mines": 1, "chips": 1}
    assert "may be mines the labels miss" in meta["hard_negatives"]["rule"]
    missed = gpd.read_parquet(tmp_path / "hard" / "possible_missed_mines.parquet")
    assert len(missed) == 1 and missed.mean_probability.iloc[0] == 0.97
    assert len(hard) == 1 and hard.kind.iloc[0] == "hard_negative"
    chip = hard.to_crs("EPSG:3857").geometry.iloc[0]
    assert chip.contains(_label_px(100, 400, 110, 410))
    with rasterio.open(tmp_path / "hard" / hard["mask"].iloc[0]) as m:
        assert set(np.unique(m.read(1))) == {0}  # all background: taught as such
    # the split of a hard negative is its block's
    blocks_split = pd.read_parquet(tmp_path / "chips" / "blocks.parquet")
    bx, by = map(int, hard.block.iloc[0].split("_"))
    assert hard.split.iloc[0] == blocks_split[(blocks_split.bx == bx) & (blocks_split.by == by)].split.iloc[0]


def test_possible_missed_mines_cover_at_most_a_share_of_the_labelled_area(tmp_path):
    """Six 20 px labels (2,400 px2). Two sure detections far from them, 30 x 30 px each (900 px2): at a share of
    0.5 (1,200 px2) only the surer is spared as a possible missed mine, the other is taught as a false alarm with
    a chip of its own; without a cap both are spared."""
    from minemap.chips import hard_negative_chips
    from minemap.config import HardNegativeConfig

    src, lab, cfg = _six_mines_chipped(tmp_path)
    surer, less_sure = _label_px(400, 140, 430, 170), _label_px(60, 400, 90, 430)
    det = gpd.GeoDataFrame({"mean_probability": [0.95, 0.97]}, geometry=[less_sure, surer],
                           crs="EPSG:3857").to_crs("EPSG:4326")
    lab4326 = lab.to_crs("EPSG:4326")
    hard = hard_negative_chips(det, lab4326, src, tmp_path / "chips", tmp_path / "capped", cfg,
                               HardNegativeConfig(buffer_m=40.0, per_positive=1.0, max_missed_share=0.5))
    meta = json.loads((tmp_path / "capped" / "meta.json").read_text())["hard_negatives"]
    assert {k: meta[k] for k in ("ignored_as_possible_missed_mines", "false_alarms", "taught_beyond_missed_share",
                                 "chips")} == {"ignored_as_possible_missed_mines": 1, "false_alarms": 1,
                                               "taught_beyond_missed_share": 1, "chips": 1}
    assert "at most 0.5 x the labelled area" in meta["rule"]
    missed = gpd.read_parquet(tmp_path / "capped" / "possible_missed_mines.parquet")
    assert missed.mean_probability.tolist() == [0.97]
    chip = hard.to_crs("EPSG:3857").geometry.iloc[0]
    assert chip.intersects(less_sure) and not chip.intersects(surer)
    with rasterio.open(tmp_path / "capped" / hard["mask"].iloc[0]) as m:
        assert set(np.unique(m.read(1))) == {0}  # the less sure field is taught as background

    hard_negative_chips(det, lab4326, src, tmp_path / "chips", tmp_path / "uncapped", cfg,
                        HardNegativeConfig(buffer_m=40.0, per_positive=1.0, max_missed_share=None))
    meta = json.loads((tmp_path / "uncapped" / "meta.json").read_text())["hard_negatives"]
    assert (meta["ignored_as_possible_missed_mines"], meta["false_alarms"], meta["taught_beyond_missed_share"]) \
        == (2, 0, 0)
    assert "labelled area" not in meta["rule"]


def test_reviewed_verdicts_overrule_the_models_confidence(tmp_path):
    """A detection the model is sure of, away from the labels, would be spared as a possible missed mine. A
    reviewer who rejects it gets it taught as background: training chips over it (several for a field wider
    than a chip), none of its pixels spared by the hard negatives; an outline the reviewer was unsure of is ignored in
    every chip."""
    from minemap.chips import hard_negative_chips
    from minemap.config import HardNegativeConfig
    from minemap.review import TrainingVerdicts

    src, lab, cfg = _six_mines_chipped(tmp_path)
    field, unsure_spot = _label_px(400, 100, 440, 112), _label_px(100, 400, 110, 410)  # the field: 40 x 12 px
    det = gpd.GeoDataFrame({"mean_probability": [0.97]}, geometry=[field], crs="EPSG:3857").to_crs("EPSG:4326")
    hn = HardNegativeConfig(buffer_m=40.0, per_positive=1.0)
    lab4326 = lab.to_crs("EPSG:4326")
    hard_negative_chips(det, lab4326, src, tmp_path / "chips", tmp_path / "auto", cfg, hn)
    auto = json.loads((tmp_path / "auto" / "meta.json").read_text())["hard_negatives"]
    assert (auto["ignored_as_possible_missed_mines"], auto["chips"]) == (1, 0)

    def to_ll(g):
        return np.asarray(gpd.GeoSeries([g], crs="EPSG:3857").to_crs("EPSG:4326").values)

    verdicts = TrainingVerdicts(positives=np.empty(0, object), drop_labels=np.empty(0, object),
                                rejected=to_ll(field.buffer(2)), unsure=to_ll(unsure_spot))
    index = make_chips(lab4326, src, 2019, tmp_path / "reviewed_chips", cfg, reviewed=verdicts)
    neg = index[index.kind == "reviewed_negative"].to_crs("EPSG:3857")
    # 32 px chips over a 44 px outline: one centred on it, one for what is left on each side
    assert len(neg) == 3 and shapely.union_all(neg.geometry.values).contains(field)
    for m in neg["mask"]:
        with rasterio.open(tmp_path / "reviewed_chips" / m) as f:
            assert set(np.unique(f.read(1))) == {0}
    meta = json.loads((tmp_path / "reviewed_chips" / "meta.json").read_text())
    assert meta["review"] == {"not_mine_outlines": 1, "reviewed_negative_chips": 3, "unsure_outlines_ignored": 1}
    assert (index.kind != "reviewed_negative").sum() == len(gpd.read_parquet(tmp_path / "chips" / "index.parquet"))

    hard_negative_chips(det, lab4326, src, tmp_path / "reviewed_chips", tmp_path / "reviewed", cfg, hn,
                        reviewed=verdicts)
    meta = json.loads((tmp_path / "reviewed" / "meta.json").read_text())["hard_negatives"]
    assert {k: meta[k] for k in ("ignored_as_possible_missed_mines", "false_alarms", "reviewed_not_mine",
                                 "reviewed_unsure", "chips")} == {
        "ignored_as_possible_missed_mines": 0, "false_alarms": 1, "reviewed_not_mine": 1, "reviewed_unsure": 1,
        "chips": 0}  # a false alarm now, already taught by the training chips: no second chip
    ignored = gpd.read_parquet(tmp_path / "reviewed" / "possible_missed_mines.parquet").to_crs("EPSG:3857")
    assert len(ignored) == 1 and ignored.geometry.iloc[0].equals_exact(unsure_spot, 1e-3)


def test_every_split_gets_a_labelled_block_when_there_are_enough():
    from minemap.chips.splits import assign_splits

    three = {(0, 0): 100.0, (1, 0): 100.0, (2, 0): 100.0}
    assert sorted(assign_splits(three, [], ChipConfig()).values()) == ["test", "train", "val"]
    two = {(0, 0): 100.0, (1, 0): 50.0}
    assert "train" in assign_splits(two, [], ChipConfig()).values()


def test_a_field_touching_a_mine_is_judged_on_its_own(tmp_path):
    """A detection that runs from a labelled mine into a field: sure on the mine, unsure on the field. Judged on its
    part beyond the buffer (from the probability tiles), the field is a false alarm to teach, not a missed mine."""
    from minemap.chips import hard_negative_chips
    from minemap.config import HardNegativeConfig
    from minemap.formats.rasters import quantise, write_cog

    src, lab, cfg = _six_mines_chipped(tmp_path)
    prob = np.zeros((512, 512), np.float32)
    prob[200:220, 200:220] = 0.99  # the labelled mine
    prob[200:220, 220:280] = 0.5  # a field beside it, 60 px long
    grid = src.grid(2019)
    write_cog(tmp_path / "p" / "t.tif", quantise(prob), grid)
    whole = float(prob[200:220, 200:280].mean())
    det = gpd.GeoDataFrame({"mean_probability": [whole]}, geometry=[_label_px(200, 200, 280, 220)],
                           crs="EPSG:3857").to_crs("EPSG:4326")
    hn = HardNegativeConfig(buffer_m=40.0, per_positive=1.0, max_probability=0.6)
    assert whole >= 0.6  # as a whole, as sure as the labelled mines
    hard_negative_chips(det, lab.to_crs("EPSG:4326"), src, tmp_path / "chips", tmp_path / "without", cfg, hn)
    meta = json.loads((tmp_path / "without" / "meta.json").read_text())["hard_negatives"]
    assert meta["ignored_as_possible_missed_mines"] == 1 and meta["false_alarms"] == 0
    hard_negative_chips(det, lab.to_crs("EPSG:4326"), src, tmp_path / "chips", tmp_path / "with", cfg, hn,
                        prob_paths=[tmp_path / "p" / "t.tif"])
    meta = json.loads((tmp_path / "with" / "meta.json").read_text())["hard_negatives"]
    assert meta["ignored_as_possible_missed_mines"] == 0 and meta["false_alarms"] == 1
    assert "judged on its part beyond" in meta["rule"]


def _rare_surface_cover(n_side=4, rare=((0, 0), (1, 3), (2, 3), (3, 3))):
    """Land cover of n_side x n_side blocks: every block mostly forest (group 0), a few with a rare field surface
    (group 1, 30 of its 256 samples), all blocks holding about as many labelled pixels."""
    cover, weights = {}, {}
    rng = np.random.default_rng(3)
    for bx in range(n_side):
        for by in range(n_side):
            field = 30.0 if (bx, by) in rare else 0.0
            cover[(bx, by)] = np.array([256.0 - field, field])
            weights[(bx, by)] = float(rng.uniform(800, 1200))
    return cover, weights


def test_cover_balance_gives_train_its_share_of_every_surface():
    """A surface found in four blocks of sixteen: split by labelled pixels alone, train gets it by chance (for some
    seeds hardly any); balanced by cover, train holds most of it for every seed, and the labelled-pixel shares
    stay near their targets, train the largest, val and test each with a block."""
    from minemap.chips.splits import assign_splits

    cover, weights = _rare_surface_cover()
    field_total = sum(h[1] for h in cover.values())
    plain, balanced = [], []
    for seed in range(30):
        cfg = ChipConfig(seed=seed)
        for store, cov in ((plain, None), (balanced, cover)):
            splits = assign_splits(weights, [], cfg, cov)
            field = {s: sum(cover[b][1] for b in splits if splits[b] == s) / field_total for s in ("train", "val", "test")}
            pos = {s: sum(w for b, w in weights.items() if splits[b] == s) / sum(weights.values())
                   for s in ("train", "val", "test")}
            store.append(field["train"])
            if cov is not None:
                assert 0.6 <= pos["train"] <= 0.8 and pos["train"] > max(pos["val"], pos["test"]), (seed, pos)
                assert min(pos.values()) > 0, (seed, pos)
    assert min(plain) <= 0.25  # the check can fail: without cover some seed leaves train a quarter or less
    assert min(balanced) >= 0.5, balanced


def test_cover_places_unlabelled_blocks_where_surfaces_are_missing():
    """Blocks without labels go to the split whose surfaces they bring nearest the targets: a rare surface found
    only in unlabelled blocks is shared out, not left to the draw of a coin."""
    from minemap.chips.splits import assign_splits

    cover, weights = _rare_surface_cover(rare=())
    extra = {(4, y): np.array([200.0, 56.0]) for y in range(10)}  # ten unlabelled blocks with the field surface
    cover.update(extra)
    for seed in range(10):
        splits = assign_splits(weights, sorted(extra), ChipConfig(seed=seed), cover)
        got = [splits[b] for b in sorted(extra)]
        assert got.count("train") == 7 and got.count("val") + got.count("test") == 3, (seed, got)


def test_block_cover_groups_surfaces_from_the_imagery(tmp_path):
    """block_cover reads each block at low resolution and groups its pixels by spectra: a bright field in one
    block is a group of its own, found there only; make_chips records the shares per split."""
    from minemap.chips.splits import block_cover

    size = 256
    data = np.full((4, size, size), 1000, np.uint16)
    data[:, :, :] = np.array([350, 600, 380, 3000], np.uint16)[:, None, None]  # forest
    data[:, 10:50, 140:200] = np.array([2000, 1700, 1200, 2500], np.uint16)[:, None, None]  # a field, block (2, 0)
    write_raster(tmp_path / "img" / "2019" / "a.tif", data, T, descriptions=("red", "green", "blue", "nir"))
    src = open_imagery(tmp_path / "img")
    grid = src.grid(2019)
    blocks = [(bx, by) for bx in range(4) for by in range(4)]
    cover = block_cover(src, 2019, grid, blocks, 64, 4, np.random.default_rng(0))
    assert sorted(cover) == blocks
    assert all(h.sum() == 256 for h in cover.values())  # 16 x 16 samples a block
    groups_in_field_block = set(np.flatnonzero(cover[(2, 0)]))
    groups_elsewhere = set().union(*(set(np.flatnonzero(h)) for b, h in cover.items() if b not in {(2, 0), (3, 0)}))
    field = groups_in_field_block - groups_elsewhere
    assert len(field) == 1
    (g,) = field
    assert 0.45 < cover[(2, 0)][g] / 256 < 0.57  # rows 10-50 and columns 140-192 of the block: 40 x 52 of 64 x 64 px

    lab = gpd.GeoDataFrame(geometry=[_label_px(x, y, x + 12, y + 12) for x in (20, 84, 148, 212)
                                     for y in (70, 140, 200)], crs="EPSG:3857")
    make_chips(lab, src, 2019, tmp_path / "chips", ChipConfig(chip_size=32, block_size=64, seed=1))
    shares = json.loads((tmp_path / "chips" / "meta.json").read_text())["land_cover_shares"]
    assert set(shares) == {"train", "val", "test"}
    assert all(sum(v[i] for v in shares.values()) == pytest.approx(1, abs=0.01) for i in range(len(shares["train"])))


def test_labelled_ground_is_the_blocks_around_labels():
    from minemap.chips.splits import labelled_ground

    blocks = {(x, y) for x in range(5) for y in range(4)}
    assert labelled_ground(blocks, {(0, 0)}, 1) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert labelled_ground(blocks, {(2, 2)}, 0) == {(2, 2)}
    assert len(labelled_ground(blocks, {(2, 1)}, 1)) == 9 and labelled_ground(blocks, {(0, 0)}, None) == blocks


def test_background_only_from_labelled_ground(tmp_path):
    """Labels only in the western quarter of a scene: background chips come from blocks within
    chips.background_reach of a labelled one, never from the far east, which may hold mines nobody drew; with
    the reach off they may come from anywhere."""
    src = _scene(tmp_path, size=768)
    rng = np.random.default_rng(3)
    polys = [_label_px(x, y, x + 20, y + 20) for x, y in zip(rng.integers(0, 150, 30), rng.integers(0, 740, 30))]
    lab = gpd.GeoDataFrame(geometry=polys, crs="EPSG:3857")
    cfg = ChipConfig(chip_size=32, stride=32, block_size=96, background_per_positive=2.0, val_fraction=0.2,
                     test_fraction=0.2, seed=2, balance_cover=False)
    index = make_chips(lab, src, 2019, tmp_path / "chips", cfg).to_crs("EPSG:3857")
    blocks = gpd.read_parquet(tmp_path / "chips" / "blocks.parquet")
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    labelled_columns = {int(b.bx) for b in blocks.itertuples() if b.label_pixels > 0}
    assert max(labelled_columns) <= 1  # labels in the first two columns of blocks (pixels 0..191)
    ground = blocks[blocks.labelled_ground]
    assert set(ground.bx) == {0, 1, 2}  # the labelled columns and one beyond
    assert meta["labelled_ground"] == {"reach_blocks": 1, "blocks": len(ground),
                                       "blocks_left_out": len(blocks) - len(ground)}
    background = index[index.kind == "background"]
    assert len(background) > 10
    assert shapely.get_x(shapely.centroid(np.asarray(background.geometry.values))).max() < 3 * 96 * RES
    anywhere = make_chips(lab, src, 2019, tmp_path / "chips2", cfg.model_copy(update={"background_reach": None}))
    far = anywhere[anywhere.kind == "background"].to_crs("EPSG:3857")
    assert shapely.get_x(shapely.centroid(np.asarray(far.geometry.values))).max() > 3 * 96 * RES


def test_blocks_carry_a_halo_of_imagery_whose_labels_are_never_learnt(tmp_path):
    """Blocks of 128 px written with 24 px of imagery around them (clipped at the scene's edge): each raster's
    pixels are the scene's over the wider window, its mask is 255 outside the block and, inside it, the mask that
    the same block gets without a halo; a label cut by a block's edge lies in its neighbour's halo as 255."""
    size, halo, block = 512, 24, 128
    rows, cols = np.mgrid[0:size, 0:size]
    data = np.stack([(rows * 3 + cols * 5 + k) % 4000 for k in range(4)]).astype(np.uint16)
    write_raster(tmp_path / "img" / "2019" / "a.tif", data, T, descriptions=("red", "green", "blue", "nir"))
    src = open_imagery(tmp_path / "img")
    lab = gpd.GeoDataFrame(geometry=[_label_px(x, y, x + 20, y + 20) for x, y in
                                     [(20, 20), (150, 30), (300, 40), (40, 300), (200, 200), (420, 420)]]
                           + [_label_px(100, 180, 140, 200)],  # across the edge between columns 0 and 1
                           crs="EPSG:3857")
    base = dict(chip_size=32, block_size=block, background_per_positive=0, seed=3, ignore_border_m=0)
    make_chips(lab, src, 2019, tmp_path / "halo", ChipConfig(**base, block_halo=halo))
    make_chips(lab, src, 2019, tmp_path / "bare", ChipConfig(**base, block_halo=0))
    table = pd.read_parquet(tmp_path / "halo" / "blocks.parquet")
    bare = pd.read_parquet(tmp_path / "bare" / "blocks.parquet").set_index(["bx", "by"])
    written = table[table.image.notna()]
    assert len(written) >= 6 and set(zip(written.bx, written.by)) == set(bare[bare.image.notna()].index)
    for b in written.itertuples():
        c, r = b.bx * block, b.by * block
        top, left = min(halo, r), min(halo, c)
        bottom, right = min(halo, size - r - block), min(halo, size - c - block)
        assert (b.core_row, b.core_col, b.core_height, b.core_width) == (top, left, block, block)
        with rasterio.open(tmp_path / "halo" / b.image) as im, rasterio.open(tmp_path / "halo" / b.mask) as mk:
            x, y = im.read(), mk.read(1)
            assert im.transform == T * Affine.translation(c - left, r - top)
        assert x.shape == (4, top + block + bottom, left + block + right)
        assert np.array_equal(x, data[:, r - top:r + block + bottom, c - left:c + block + right])
        core = y[top:top + block, left:left + block].copy()
        y[top:top + block, left:left + block] = 0
        assert (y[:top] == 255).all() and (y[top + block:] == 255).all() and (y[:, :left] == 255).all() \
            and (y[:, left + block:] == 255).all()
        with rasterio.open(tmp_path / "bare" / bare.loc[(b.bx, b.by), "mask"]) as mk:
            assert np.array_equal(core, mk.read(1))
        assert b.positive_pixels == int((core == 1).sum()) == bare.loc[(b.bx, b.by), "positive_pixels"]
    # the label across the edge: its western part (columns 100-127) is in block (0, 1), its eastern part
    # (128-139) in block (1, 1); each sees the other part's imagery in its halo, masked
    for bx, inside in ((0, slice(100, 128)), (1, slice(24, 36))):
        b = written[(written.bx == bx) & (written.by == 1)].iloc[0]
        with rasterio.open(tmp_path / "halo" / b["mask"]) as mk:
            y = mk.read(1)
        rows_in = slice(180 - 128 + b.core_row, 200 - 128 + b.core_row)
        assert (y[rows_in, inside] == 1).all()
        assert (y[rows_in, 128:] == 255).all() if bx == 0 else (y[rows_in, :24] == 255).all()


def test_other_years_show_the_training_blocks_under_each_years_sky(tmp_path):
    """chips.other_years: the training and validation blocks (and only they: never a test block) cut again from
    another year's imagery, masked by the same labels, with that year's thin clouds and shadows left out of the
    loss, and the ground that turned into a mine after the labels' year too (the labels cannot say it is
    background); training draws from both years' training blocks, validation judges both years' validation
    blocks."""
    from minemap.lattice import Grid
    from minemap.synthetic import make_scene
    from minemap.trainset import block_pieces

    scene = make_scene(tmp_path / "scene", years=(2019, 2020), size=512, n_mines=12, hazy_year=None, seed=5,
                       cloudy_year=2020)
    src = open_imagery(scene.imagery)
    labels = gpd.read_file(scene.labels)
    cfg = ChipConfig(chip_size=64, seed=1)
    with pytest.raises(InputError, match="2018"):
        make_chips(labels, src, 2019, tmp_path / "none", cfg, other_years=[2018])
    index = make_chips(labels, src, 2019, tmp_path / "chips", cfg.model_copy(update={"other_years": [2020]}))
    blocks = pd.read_parquet(tmp_path / "chips" / "blocks.parquet")
    written = blocks[blocks.image.notna()].set_index(["bx", "by"])
    training = written[written.split == "train"]
    other = pd.read_parquet(tmp_path / "chips" / "other_years.parquet")
    assert len(training) >= 3 and set(other.year) == {2020}
    assert set(zip(other.bx, other.by)) == set(written[written.split.isin(["train", "val"])].index)
    assert (other.split == "val").sum() >= 1 and "test" not in set(other.split)
    assert all(written.loc[(b.bx, b.by), "split"] == b.split for b in other.itertuples())
    with rasterio.open(scene.root / "clouds_2020.tif") as f:
        hidden_all, clouds_transform = f.read(1), f.transform
    truth = gpd.read_file(scene.truth)
    hidden_core = kept_mine = mine_core = masked_hidden = new_ground = new_ignored = 0
    for b in other.itertuples():
        this = written.loc[(b.bx, b.by)]
        assert (b.core_row, b.core_col, b.core_height, b.core_width) == \
            (this.core_row, this.core_col, this.core_height, this.core_width)
        with rasterio.open(tmp_path / "chips" / b.image) as im, rasterio.open(tmp_path / "chips" / b.mask) as mk, \
                rasterio.open(tmp_path / "chips" / this["mask"]) as first:
            x, y, y0 = im.read(), mk.read(1), first.read(1)
            grid = Grid(im.crs, im.transform, im.width, im.height)
        pixels, _ = src.read(2020, grid)
        assert np.array_equal(x, pixels)  # 2020's pixels over the 2019 block
        # the same labels; 2020 leaves out more (its clouds and shadows), never less
        assert np.array_equal(y[y != 255], y0[y != 255]) and (y[y0 == 255] == 255).all()
        col, row = (~clouds_transform * (im.transform.c, im.transform.f))
        hidden = hidden_all[round(row):round(row) + y.shape[0], round(col):round(col) + y.shape[1]] > 0
        core = np.zeros(y.shape, bool)
        core[b.core_row:b.core_row + b.core_height, b.core_col:b.core_col + b.core_width] = True
        hidden_core += int((hidden & core).sum())
        masked_hidden += int((hidden & core & (y == 255)).sum())
        mine_core += int(((y0 == 1) & core & ~hidden).sum())
        kept_mine += int(((y == 1) & core & ~hidden).sum())
        was, now = (rasterize(truth[truth.year == yr].to_crs(im.crs).geometry, out_shape=y.shape,
                              transform=im.transform) > 0 for yr in (2019, 2020))
        # mine in 2020, forest in 2019, background to the labels
        new = now & ~binary_dilation(was, iterations=2) & core & ~hidden & (y0 == 0)
        new_ground += int(new.sum())
        new_ignored += int((new & (y == 255)).sum())
    assert hidden_core > 500  # the clouds reach the training blocks
    assert masked_hidden >= 0.9 * hidden_core  # 2020's clouds and shadows are not taught
    assert kept_mine >= 0.9 * mine_core  # the mines outside them are
    assert new_ground > 300 and new_ignored >= 0.95 * new_ground  # a grown mine's new ground is not background
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    assert meta["other_years"] == {"2020": {"blocks": len(other), "positive_pixels": int(other.positive_pixels.sum())}}
    train = block_pieces(tmp_path / "chips", "train", index[index.split == "train"].assign(root=str(tmp_path / "chips")))
    val = block_pieces(tmp_path / "chips", "val")
    n_val = ((blocks.split == "val") & blocks.image.notna()).sum()
    assert len(train) == 2 * len(training) and len(val) == 2 * n_val
    assert [p.year for p in val.pieces] == [None] * n_val + [2020] * n_val  # the labels' year's first
    assert len(block_pieces(tmp_path / "chips", "test")) == ((blocks.split == "test") & blocks.image.notna()).sum()
    # a folder cut before validation blocks were cut again (no split column) holds training blocks only
    other.drop(columns="split").to_parquet(tmp_path / "chips" / "other_years.parquet")
    assert len(block_pieces(tmp_path / "chips", "val")) == n_val
    assert len(block_pieces(tmp_path / "chips", "train")) == len(training) + len(other)
    other.to_parquet(tmp_path / "chips" / "other_years.parquet")
    # anchors (the places of background chips) lie in the labels' year's blocks; windows come from both years
    assert all(i < len(training) for i, _, _ in train.anchors)
    from minemap.trainset import scan

    scan(train.pieces, None, cells=True)
    drawn = train.windows(np.random.default_rng(0), 200, 200, 64)
    assert 0.3 < np.mean([b >= len(training) for b, _, _ in drawn]) < 0.7
    train.other_share = 0.2  # train.other_years_share
    drawn = train.windows(np.random.default_rng(0), 200, 200, 64)
    assert 0.12 < np.mean([b >= len(training) for b, _, _ in drawn]) < 0.28


def test_which_other_years_training_sees():
    from minemap.chips import shown_years

    have = list(range(2016, 2025))
    assert shown_years(ChipConfig(), 2019, have) == [2020, 2021]  # the default: up to two years after the labels'
    assert shown_years(ChipConfig(), 2024, have) == []  # labels on the newest imagery: none after it
    assert shown_years(ChipConfig(other_years=0), 2019, have) == []
    assert shown_years(ChipConfig(other_years=5), 2019, [2019, 2021, 2026]) == [2021]
    assert shown_years(ChipConfig(other_years=[2018, 2019, 2023]), 2019, have) == [2018, 2023]  # as listed


def test_another_year_without_imagery_leaves_the_chips_whole(tmp_path):
    """A source that has no scenes for one of chips.other_years (a remote source offers every year, a STAC API
    may hold none that year) says so: the year is named in meta.json, the labels' year's chips are cut."""
    from minemap.errors import ImageryError
    from minemap.synthetic import make_scene

    scene = make_scene(tmp_path / "scene", years=(2019, 2020), size=384, n_mines=8, hazy_year=None, seed=3)
    src = open_imagery(scene.imagery)

    class NoScenesIn2020:
        def __getattr__(self, name):
            return getattr(src, name)

        def read(self, year, grid):
            if year == 2020:
                raise ImageryError("stac: no scenes for 2020 over bbox")
            return src.read(year, grid)

    labels = gpd.read_file(scene.labels)
    index = make_chips(labels, NoScenesIn2020(), 2019, tmp_path / "chips",
                       ChipConfig(chip_size=64, seed=1, other_years=[2020]))
    meta = json.loads((tmp_path / "chips" / "meta.json").read_text())
    assert len(index) > 0 and meta["other_years"] == {}
    assert meta["other_years_without_imagery"] == {"2020": "stac: no scenes for 2020 over bbox"}
    assert not (tmp_path / "chips" / "other_years.parquet").exists()


def test_the_labels_year_is_read_once_for_all_other_years(tmp_path):
    """Each other year's blocks are compared with the labels' year's (changed ground); that imagery is read
    once a block, not once a block and year: a third year costs no more reads of the labels' year than a second
    (a remote source fetches each read)."""
    from minemap.synthetic import make_scene

    scene = make_scene(tmp_path / "scene", years=(2019, 2020, 2021), size=384, n_mines=8, hazy_year=None, seed=3)
    src = open_imagery(scene.imagery)
    labels = gpd.read_file(scene.labels)

    def reads_of_2019(other_years, dest):
        calls = []

        class Counting:
            def __getattr__(self, name):
                return getattr(src, name)

            def read(self, year, grid):
                calls.append(year)
                return src.read(year, grid)

        make_chips(labels, Counting(), 2019, dest, ChipConfig(chip_size=64, seed=1, other_years=other_years))
        return calls.count(2019), calls.count(2021)

    two, _ = reads_of_2019([2020], tmp_path / "two")
    three, of_2021 = reads_of_2019([2020, 2021], tmp_path / "three")
    assert of_2021 > 0 and three == two


def _ellipse_px(x0, y0, x1, y1):
    """An ellipse inside the pixel box (x0, y0)-(x1, y1) of the test scene, in EPSG:3857 (rectangularity ~0.79)."""
    box_ = _label_px(x0, y0, x1, y1)
    (cx, cy), (w, h) = box_.centroid.coords[0], (box_.bounds[2] - box_.bounds[0], box_.bounds[3] - box_.bounds[1])
    return shapely.affinity.scale(shapely.Point(cx, cy).buffer(1.0, 64), w / 2, h / 2)


def test_a_sure_rectangle_away_from_the_labels_is_taught_not_spared(tmp_path):
    """Labels shaped like pits (ellipses). Two detections far from them, both as sure as the labelled mines: an
    ellipse like the labels is spared as a possible missed mine; a 30 x 20 px rectangle, a field, is taught as a
    false alarm with a chip of its own. Where the labels themselves are rectangles, the rectangle is spared too;
    with ``max_rectangularity=1`` shape never decides. A rectangle under 64 px is not judged by shape."""
    from minemap.chips import hard_negative_chips
    from minemap.geo import rectangularity
    from minemap.config import HardNegativeConfig

    src = _scene(tmp_path, size=512)
    spots = [(20, 20), (150, 30), (300, 40), (40, 300), (200, 200), (420, 420)]
    pits = gpd.GeoDataFrame(geometry=[_ellipse_px(x, y, x + 24, y + 16) for x, y in spots], crs="EPSG:3857")
    assert np.allclose(rectangularity(pits.geometry.values), np.pi / 4, atol=0.01)
    cfg = ChipConfig(chip_size=32, block_size=128, background_per_positive=0, seed=3, ignore_border_m=0)
    make_chips(pits, src, 2019, tmp_path / "chips", cfg)
    field, pit, speck = _label_px(400, 130, 430, 150), _ellipse_px(60, 400, 90, 420), _label_px(300, 300, 307, 307)
    det = gpd.GeoDataFrame({"mean_probability": [0.97, 0.96, 0.97]}, geometry=[field, pit, speck],
                           crs="EPSG:3857").to_crs("EPSG:4326")
    hn = HardNegativeConfig(buffer_m=40.0, per_positive=1.0)
    hard = hard_negative_chips(det, pits.to_crs("EPSG:4326"), src, tmp_path / "chips", tmp_path / "hard", cfg, hn)
    meta = json.loads((tmp_path / "hard" / "meta.json").read_text())["hard_negatives"]
    assert {k: meta[k] for k in ("ignored_as_possible_missed_mines", "false_alarms", "taught_as_rectangles")} == {
        "ignored_as_possible_missed_mines": 2, "false_alarms": 1, "taught_as_rectangles": 1}
    assert meta["rectangularity_level"] == 0.9 and "enclosing rectangle" in meta["rule"]
    spared = gpd.read_parquet(tmp_path / "hard" / "possible_missed_mines.parquet").to_crs("EPSG:3857")
    assert sorted(round(g.area / RES**2) for g in spared.geometry) == [49, round(pit.area / RES**2)]  # speck, pit
    chip = hard.to_crs("EPSG:3857").geometry.iloc[0]
    assert len(hard) == 1 and chip.intersects(field) and not chip.intersects(pit)
    with rasterio.open(tmp_path / "hard" / hard["mask"].iloc[0]) as m:
        assert set(np.unique(m.read(1))) == {0}  # the field taught as background

    hard_negative_chips(det, pits.to_crs("EPSG:4326"), src, tmp_path / "chips", tmp_path / "off", cfg,
                        HardNegativeConfig(buffer_m=40.0, per_positive=1.0, max_rectangularity=1))
    meta = json.loads((tmp_path / "off" / "meta.json").read_text())["hard_negatives"]
    assert (meta["ignored_as_possible_missed_mines"], meta["taught_as_rectangles"]) == (3, 0)
    assert meta["rectangularity_level"] is None and "enclosing rectangle" not in meta["rule"]

    boxes = gpd.GeoDataFrame(geometry=[_label_px(x, y, x + 24, y + 16) for x, y in spots], crs="EPSG:3857")
    make_chips(boxes, src, 2019, tmp_path / "box_chips", cfg)
    hard_negative_chips(det, boxes.to_crs("EPSG:4326"), src, tmp_path / "box_chips", tmp_path / "boxes", cfg, hn)
    meta = json.loads((tmp_path / "boxes" / "meta.json").read_text())["hard_negatives"]
    assert (meta["ignored_as_possible_missed_mines"], meta["taught_as_rectangles"]) == (3, 0)
    assert meta["rectangularity_level"] > 0.99  # the labels' own rectangles raise the level
