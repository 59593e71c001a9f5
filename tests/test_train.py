import json
import logging
import re
from pathlib import Path

import pytest
import torch

from minemap.chips import make_chips
from minemap.config import ChipConfig, ModelConfig, TrainConfig
from minemap.errors import InputError
from minemap.imagery import open_imagery
from minemap.labels import read_labels
from minemap.model import read_card, resolve_precision
from minemap.train import segmentation_loss, train
from minemap.formats.run import STATE


@pytest.fixture(scope="module")
def chips_dir(scene, tmp_path_factory):
    dest = tmp_path_factory.mktemp("chips") / "chips"
    labels, _ = read_labels([scene.labels])
    make_chips(labels, open_imagery(scene.imagery), 2019, dest,
               ChipConfig(chip_size=64, stride=32, block_size=128, background_per_positive=0.3, other_years=0))
    return dest


def test_loss_known_answers():
    target = torch.tensor([[[1, 0], [255, 1]]])
    perfect = torch.tensor([[[20.0, -20.0], [0.0, 20.0]]])
    assert float(segmentation_loss(perfect, target)) < 1e-3
    # the ignored pixel does not count, whatever its logit
    assert float(segmentation_loss(perfect.clone().index_put_((torch.tensor([0]), torch.tensor([1]),
                                                              torch.tensor([0])), torch.tensor(-50.0)),
                                   target)) < 1e-3
    wrong = -perfect
    assert float(segmentation_loss(wrong, target)) > 10


def test_train_writes_model_card_and_resumes(chips_dir, tmp_path, caplog):
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3)
    card = train(chips_dir, tmp_path / "model", cfg, ModelConfig(encoder="mit-b0"), progress=False)
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"weights.safetensors", "model.json", STATE} <= files
    assert card.bands == ["red", "green", "blue", "nir"] and len(card.band_mean) == 4 and min(card.band_std) > 0
    assert card.chip_size == 64 and card.gsd_m == pytest.approx(4.75, abs=0.05) and card.train_year == 2019
    assert 0 < card.threshold < 1 and set(card.val_metrics) >= {"f1", "iou", "precision", "recall", "threshold"}
    assert card.labels_fingerprint and len(card.labels_fingerprint) == 64
    assert card.epochs_trained == 2 and card.best_epoch in (1, 2)
    assert card.precision == ("bf16" if resolve_precision("auto", torch.device("cpu")) else "fp32")
    state = torch.load(tmp_path / "model" / STATE, weights_only=False)
    assert state["progress"]["epoch"] == 1
    # resume: two more epochs on top of the saved state, not four from scratch
    with caplog.at_level(logging.INFO, logger="minemap"):
        card = train(chips_dir, tmp_path / "model", TrainConfig(epochs=4, batch_size=8, learning_rate=1e-3),
                     resume=True, progress=False)
    assert "resuming at epoch 3" in caplog.text
    assert "epoch 1:" not in caplog.text and "epoch 4:" in caplog.text
    assert read_card(tmp_path / "model").epochs_trained == 4


def test_train_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not a chips folder"):
        train(tmp_path, tmp_path / "model", progress=False)


def test_training_stops_when_validation_stalls(chips_dir, tmp_path):
    """With a learning rate too small to change anything, validation F1 never improves after epoch 1: patience 1
    stops after epoch 2, long before the cap, and the card says so and keeps the curve."""
    cfg = TrainConfig(epochs=10, patience=1, batch_size=8, learning_rate=1e-12, min_val_pixels=0, stopping="early")
    card = train(chips_dir, tmp_path / "model", cfg, progress=False)
    assert card.epochs_trained == 2 and card.best_epoch == 1 and card.stopped.startswith("early")
    assert [c["epoch"] for c in card.val_curve] == [1, 2]
    assert set(card.val_curve[0]) >= {"loss", "lr", "val_f1", "val_iou", "val_threshold"}
    assert card.val_curve[1]["lr"] == pytest.approx(card.val_curve[0]["lr"] / 2)  # the plateau halves the rate
    on_disk = read_card(tmp_path / "model")
    assert on_disk.val_curve == card.val_curve and on_disk.splits["train"]["chips"] > 0
    # train.stopping = fixed: the same stalled validation runs every epoch and keeps the last weights, the rate
    # halved every `patience` epochs, and the card says it was asked for (not forced by a small validation)
    fixed = train(chips_dir, tmp_path / "fixed", cfg.model_copy(update={"epochs": 3, "stopping": "fixed"}),
                  progress=False)
    assert fixed.epochs_trained == 3 and fixed.best_epoch == 3 and fixed.stopped == "at the cap of 3 epochs"
    assert fixed.selection["rule"].endswith("the last weights kept (train.stopping = fixed)")
    assert [c["lr"] / fixed.val_curve[0]["lr"] for c in fixed.val_curve] == pytest.approx([1, 0.5, 0.25])


def test_card_records_calibration_splits_and_weak_models(chips_dir, tmp_path):
    from minemap.train import weak_model_error

    card = train(chips_dir, tmp_path / "model", TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3),
                 progress=False)
    assert card.calibration["method"] == "platt" and card.calibration["scale"] > 0
    for part in (card.val_metrics, card.test_metrics):
        rel = part["calibration"]
        assert 0 <= rel["ece"] <= 1 and sum(r["pixels"] for r in rel["table"]) > 0
    # the reliability table adds up to the pixels the metrics count
    assert sum(r["pixels"] for r in card.test_metrics["calibration"]["table"]) == sum(
        card.test_metrics[k] for k in ("tp", "fp", "fn", "tn"))
    meta_splits = json.loads((chips_dir / "meta.json").read_text())["splits"]
    assert {s: card.splits[s]["positive_pixels"] for s in meta_splits} == {
        s: v["positive_pixels"] for s, v in meta_splits.items()}
    assert weak_model_error(card, 0.0, tmp_path / "model") is None
    err = weak_model_error(card, 1.0, tmp_path / "model")
    assert err is not None and f"validation F1 {card.val_metrics['f1']:.3f} is below the floor 1.00" in str(err)


def test_the_floor_does_not_judge_by_a_validation_too_small(caplog):
    """A validation with fewer labelled pixels than train.min_val_pixels does not stop a run alone: the floor
    judges validation and test blocks pooled, and warns without stopping where those are still too few."""
    from minemap.model import ModelCard
    from minemap.train import weak_model_error

    def card(val, test, n_val):
        tp, fp, fn = val
        f1 = 2 * tp / (2 * tp + fp + fn)
        return ModelCard(encoder="x", bands=["r"], band_mean=[0.0], band_std=[1.0], gsd_m=4.77, pixel_size=[1, 1],
                         crs="EPSG:3857", chip_size=64, val_metrics={"f1": f1, "tp": tp, "fp": fp, "fn": fn},
                         test_metrics=dict(zip(("tp", "fp", "fn"), test)),
                         selection={"validation_positive_pixels": n_val})

    # validation 0.26 on 3,100 pixels; test blocks 0.76 on 2,400: pooled 0.51 over 5,500 labelled pixels
    weak_val = card((740, 1890, 2360), (2240, 1270, 160), 3100)
    assert weak_model_error(weak_val, 0.5, Path("m"), min_pixels=0) is not None  # the validation alone judges
    assert weak_model_error(weak_val, 0.5, Path("m"), min_pixels=5000) is None
    err = weak_model_error(weak_val, 0.6, Path("m"), min_pixels=5000)
    assert err is not None and "F1 of the validation and test blocks pooled" in str(err) and "0.512" in str(err)
    # pooled still fewer than the bound: a warning, the run goes on
    tiny = card((10, 80, 90), (5, 50, 40), 100)
    with caplog.at_level("WARNING"):
        assert weak_model_error(tiny, 0.5, Path("m"), min_pixels=5000) is None
    assert "too few to judge the model by" in caplog.text and "145 labelled pixels" in caplog.text
    # a validation large enough judges alone, as before
    assert weak_model_error(card((10, 80, 90), (5000, 10, 10), 6000), 0.5, Path("m"), min_pixels=5000) is not None


def test_finetune_starts_from_the_given_model(chips_dir, tmp_path):
    import shutil

    import geopandas as gpd

    first = train(chips_dir, tmp_path / "first", TrainConfig(epochs=1, batch_size=8), progress=False)
    # the same chips again: nothing new to learn, the given model is kept (epoch 0) and only recalibrated
    same = train(chips_dir, tmp_path / "same", TrainConfig(epochs=1, batch_size=8), progress=False,
                 init_from=tmp_path / "first", epochs=3)
    assert same.best_epoch == 0 and same.val_curve == [] and same.stopped == "nothing new to fine-tune on"
    assert (tmp_path / "same" / "weights.safetensors").read_bytes() == (
        tmp_path / "first" / "weights.safetensors").read_bytes()
    # with hard negatives among the training chips it trains, from the given weights, at a third of the rate
    hard = tmp_path / "hard"
    shutil.copytree(chips_dir, hard)
    idx = gpd.read_parquet(hard / "index.parquet")
    idx["kind"] = "hard_negative"
    idx.to_parquet(hard / "index.parquet")
    tuned = train([chips_dir, hard], tmp_path / "tuned", TrainConfig(epochs=1, batch_size=8), progress=False,
                  init_from=tmp_path / "first", epochs=1)
    assert tuned.band_mean == first.band_mean and tuned.band_std == first.band_std
    assert tuned.best_epoch in (0, 1) and tuned.val_curve[0]["lr"] == pytest.approx(6e-4 / 3)
    assert tuned.splits["train"]["by_kind"]["hard_negative"] == first.splits["train"]["chips"]


def test_a_finetune_is_kept_unless_validation_falls_beyond_keep_within(chips_dir, tmp_path):
    """The hard negatives a fine-tune learns lie mostly outside the validation blocks, which cannot reward them:
    its epoch is kept unless its validation F1 falls more than keep_within below the given model's. A margin of 1
    always keeps the fine-tune; a margin of 0 keeps the given model's very weights unless validation improves."""
    import re
    import shutil

    import geopandas as gpd

    from minemap.train import MIN_DELTA

    first = tmp_path / "first"
    train(chips_dir, first, TrainConfig(epochs=1, batch_size=8, min_val_pixels=0), progress=False)
    hard = tmp_path / "hard"
    shutil.copytree(chips_dir, hard)
    idx = gpd.read_parquet(hard / "index.parquet")
    idx["kind"] = "hard_negative"
    idx.to_parquet(hard / "index.parquet")
    cfg = TrainConfig(batch_size=8, min_val_pixels=0)
    cards = {kw: train([chips_dir, hard], tmp_path / f"kw{kw}", cfg, progress=False, init_from=first, epochs=1,
                       keep_within=kw) for kw in (0.0, 1.0)}
    assert cards[1.0].best_epoch == 1 and "within 1 of it" in cards[1.0].selection["fine_tune"]
    assert read_card(tmp_path / "kw1.0").best_epoch == 1
    assert (tmp_path / "kw1.0" / "weights.safetensors").read_bytes() != (first / "weights.safetensors").read_bytes()
    # the same epoch (same seed) judged against the given model's validation F1 with no margin
    strict = cards[0.0]
    assert strict.val_curve[0]["val_f1"] == cards[1.0].val_curve[0]["val_f1"]
    given = float(re.search(r"validation F1 ([0-9.]+)", strict.selection["fine_tune"]).group(1))
    assert "within 0 of it" in strict.selection["fine_tune"] and strict.best_epoch in (0, 1)
    if strict.best_epoch == 0:  # (the given F1 is printed to 4 places, the curve's to 5)
        assert strict.val_curve[0]["val_f1"] <= given + MIN_DELTA + 1e-4
        assert (tmp_path / "kw0.0" / "weights.safetensors").read_bytes() == (
            first / "weights.safetensors").read_bytes()
    else:
        assert strict.val_curve[0]["val_f1"] > given + MIN_DELTA - 1e-4


def test_a_state_from_other_settings_is_never_resumed(chips_dir, tmp_path, caplog):
    train(chips_dir, tmp_path / "model", TrainConfig(epochs=2, batch_size=8), progress=False, run_key="A")
    with caplog.at_level(logging.INFO, logger="minemap"):
        card = train(chips_dir, tmp_path / "model", TrainConfig(epochs=1, batch_size=8), resume=True,
                     progress=False, run_key="B")
    assert "saved by a training with other settings" in caplog.text and "resuming" not in caplog.text
    assert card.epochs_trained == 1 and len(card.val_curve) == 1
    assert torch.load(tmp_path / "model" / STATE, weights_only=False)["progress"]["key"] == "B"


def test_possible_missed_mines_are_ignored_in_every_chip(chips_dir, tmp_path):
    """A detection judged a possible missed mine turns the background pixels under it to 255 in the chips
    (labelled pixels stay 1), and the count of such pixels is known."""
    import geopandas as gpd
    import shapely

    from minemap.formats.chips import possible_missed_mines, read_index
    from minemap.trainset import read_pair

    index = read_index([chips_dir])
    chip = gpd.read_parquet(chips_dir / "index.parquet").iloc[[0]]
    (tmp_path / "hard").mkdir()
    gpd.GeoDataFrame({"mean_probability": [0.95]}, geometry=[shapely.box(*chip.total_bounds)],
                     crs="EPSG:4326").to_parquet(tmp_path / "hard" / "possible_missed_mines.parquet")
    missed = possible_missed_mines([chips_dir, tmp_path / "hard"])
    assert len(missed) == 1
    image, mask = (chips_dir / index.image[0], chips_dir / index["mask"][0])
    _, plain, none = read_pair(image, mask)
    _, cleaned, n = read_pair(image, mask, missed)
    assert none == 0 and n == int((plain == 0).sum()) > 0
    assert ((cleaned == 255) == ((plain == 255) | (plain == 0))).all() and ((cleaned == 1) == (plain == 1)).all()
    # a window of the chip is cleaned alike
    from rasterio.windows import Window

    _, part, m = read_pair(image, mask, missed, Window(8, 4, 32, 32))
    assert (part == cleaned[4:36, 8:40]).all() and m == int((plain[4:36, 8:40] == 0).sum())


def test_random_crops_keep_image_and_mask_aligned():
    """Training crops: the default takes 192 px of a 256 px chip and nothing of a smaller one; a crop is the
    same window of image and mask; a crop size that is no multiple of 32 is refused."""
    import numpy as np

    from minemap.train import crop_size
    from minemap.trainset import Augment

    assert crop_size(TrainConfig(), 256) == 192 and crop_size(TrainConfig(), 128) is None
    assert crop_size(TrainConfig(crop_size=128), 256) == 128 and crop_size(TrainConfig(crop_size=256), 256) is None
    with pytest.raises(InputError, match="multiple of 32"):
        crop_size(TrainConfig(crop_size=100), 256)
    rng = np.random.default_rng(0)
    aug = Augment(2000.0, crop=192)
    for k in range(6):
        y = torch.as_tensor(rng.random((256, 256)) < 0.3, dtype=torch.int64)
        x = torch.zeros(4, 256, 256)
        x[0] = 10000.0 * y  # band 0 carries the mask; band 1 is flat: whatever the jitter, band 0 - band 1 shows it
        xa, ya = aug(x, y, torch.Generator().manual_seed(k))
        assert xa.shape == (4, 192, 192) and ya.shape == (192, 192)
        assert torch.equal((xa[0] - xa[1] > 700).to(torch.int64), ya)
    # the item's generator alone decides: the same seed, the same augmentation
    again = aug(x, y, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], xa) and torch.equal(again[1], ya)


def test_resumed_training_equals_an_uninterrupted_one(chips_dir, tmp_path):
    """Weights, their moving average and the curve after 2 + 1 epochs (resumed) equal those of 3 in one go."""
    def cfg(epochs):
        return TrainConfig(epochs=epochs, batch_size=8, learning_rate=1e-3, patience=10)

    train(chips_dir, tmp_path / "straight", cfg(3), progress=False, run_key="k")
    train(chips_dir, tmp_path / "resumed", cfg(2), progress=False, run_key="k")
    train(chips_dir, tmp_path / "resumed", cfg(3), resume=True, progress=False, run_key="k")
    a, b = (torch.load(tmp_path / d / STATE, weights_only=False) for d in ("straight", "resumed"))
    assert a["average"] is not None and int(a["average"]["n_averaged"]) > 1
    for part in ("model", "average"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [e["val_f1"] for e in a["progress"]["curve"]] == [e["val_f1"] for e in b["progress"]["curve"]]


def test_windows_are_drawn_anywhere_inside_the_training_blocks(chips_dir, tmp_path):
    import geopandas as gpd
    import numpy as np

    from minemap.trainset import WindowDataset, block_pieces, scan

    table = gpd.read_parquet(chips_dir / "blocks.parquet")
    written = table[table.image.notna()]
    assert set(written.split) == {"train", "val", "test"}
    blocks = block_pieces(chips_dir, "train")
    scan(blocks.pieces, None, cells=True)
    assert len(blocks) == int((written.split == "train").sum())
    assert blocks.positive_pixels == int(written.loc[written.split == "train", "positive_pixels"].sum()) > 0
    rng = np.random.default_rng(0)
    windows = blocks.windows(rng, 200, 200, 64)
    across = 0
    for k, (b, r, c) in enumerate(windows):  # every window inside its raster, over its block (those that need
        p = blocks.pieces[b]                  # no label: their centre inside it)
        assert 0 <= r <= p.height - 64 and 0 <= c <= p.width - 64
        cr, cc, ch, cw = p.core
        reach = 0 if k >= 200 else 32  # a window holding a label holds a labelled pixel
        assert cr - reach <= r + 32 < cr + ch + reach and cc - reach <= c + 32 < cc + cw + reach
        across += r < cr or c < cc or r + 64 > cr + ch or c + 64 > cc + cw
    assert across > 40  # many reach across the block's edge into its halo (32 px: the least the default gives)
    read = WindowDataset([(k, ("w", *w)) for k, w in enumerate(windows)], blocks, [], 64, None, None,
                         np.zeros(4, np.float32), np.ones(4, np.float32), 0, 0)
    pairs = [read[k] for k in range(len(read))]
    x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    assert x.shape == (400, 4, 64, 64) and (y[:200] == 1).any(dim=(1, 2)).all()  # positives hold a label
    # anywhere, not on a grid: many distinct places, offsets that are not multiples of a stride
    assert len(set(windows)) > 350 and len({(r % 32, c % 32) for _, r, c in windows}) > 100
    # half the windows that need no label lie around the background chips' places (the surfaces they cover)
    from minemap.formats.chips import read_index

    index = read_index([chips_dir])
    anchored = block_pieces(chips_dir, "train", chips=index[index.split == "train"])
    scan(anchored.pieces, None, cells=True)
    assert len(anchored.anchors) == int(((index.split == "train") & (index.kind == "background")).sum()) > 0
    near = set(anchored.anchors)
    drawn = anchored.windows(np.random.default_rng(1), 0, 400, 64)
    close = [any(b == a and abs(r - ar) <= 32 and abs(c - ac) <= 32 for a, ar, ac in near) for b, r, c in drawn]
    assert 0.4 < np.mean(close) < 0.9
    card = train(chips_dir, tmp_path / "model", TrainConfig(epochs=1, batch_size=8, min_val_pixels=10 ** 9),
                 progress=False)
    assert re.match(r"\d+ windows drawn anywhere inside the training blocks each epoch", card.selection["training"])
    assert int(card.selection["training"].split()[0]) >= TrainConfig().epoch_windows
    assert card.selection["validation"] == "blocks, wall to wall" and card.selection["test"] == "blocks, wall to wall"
    assert card.selection["rule"].startswith("a fixed schedule") and card.stopped == "at the cap of 1 epochs"


def test_windows_holding_a_label_are_drawn_per_outline(tmp_path):
    """A block with a 64 x 64 px pit and a dredging site 2 px wide and 64 px long: drawn by labelled pixels, the
    thin site is in 128 / 4224 = 3 % of the windows holding a label; by outlines (each in proportion to the square
    root of its area), in sqrt(128) / (sqrt(4096) + sqrt(128)) = 15 %."""
    import numpy as np
    import rasterio
    from affine import Affine

    from minemap.trainset import Blocks, Piece, scan

    mask = np.zeros((256, 256), np.uint8)
    mask[16:80, 16:80] = 1  # the pit
    mask[200:202, 160:224] = 1  # the dredging site, far from the pit (no window of 32 px holds both)
    image = np.full((4, 256, 256), 500, np.uint16)
    profile = dict(driver="GTiff", width=256, height=256, crs="EPSG:32630", transform=Affine(4.77, 0, 0, 0, -4.77, 0))
    with rasterio.open(tmp_path / "i.tif", "w", count=4, dtype="uint16", **profile) as dst:
        dst.write(image)
    with rasterio.open(tmp_path / "m.tif", "w", count=1, dtype="uint8", **profile) as dst:
        dst.write(mask, 1)
    piece = Piece(str(tmp_path / "i.tif"), str(tmp_path / "m.tif"))
    scan([piece], None, cells=True)
    assert piece.counts.sum() == 4096 + 128
    # each outline weighs the square root of its pixels, spread over its cells by its pixels
    assert np.isclose(piece.weights.sum(), 64 + np.sqrt(128), rtol=1e-5)
    thin = {}
    for weighting in ("pixels", "outlines"):
        drawn = Blocks([piece], weighting=weighting).windows(np.random.default_rng(0), 4000, 0, 32)
        assert all(mask[r:r + 32, c:c + 32].any() for _, r, c in drawn)
        thin[weighting] = np.mean([r > 150 for _, r, c in drawn])
    assert abs(thin["pixels"] - 128 / 4224) < 0.01
    assert abs(thin["outlines"] - np.sqrt(128) / (64 + np.sqrt(128))) < 0.02


def test_a_fine_head_is_trained_and_fine_tuned_as_such(chips_dir, tmp_path):
    """model.head = "fine" reaches the card, and a fine-tune of that model (the hard-negative stage's) keeps its
    head: both folders load."""
    from minemap.model import load_model

    cfg = TrainConfig(epochs=1, batch_size=8, min_val_pixels=10 ** 9, epoch_windows=8)
    card = train(chips_dir, tmp_path / "m", cfg, ModelConfig(head="fine"), progress=False)
    assert card.head == "fine"
    tuned = train(chips_dir, tmp_path / "m2", cfg, init_from=tmp_path / "m", epochs=1, progress=False)
    assert tuned.head == "fine"
    for d in ("m", "m2"):
        model, c = load_model(tmp_path / d)
        assert c.head == "fine" and type(model).__name__ == "FineSegformer"


def test_an_epoch_draws_at_least_epoch_windows():
    """A small area's dozen chips still give an epoch of train.epoch_windows windows, in the chips' proportion of
    positives; a large area's chips are all drawn; a kind the chips lack is never drawn."""
    from minemap.train import epoch_windows

    assert epoch_windows(6, 3, 128) == (85, 43)
    assert epoch_windows(300, 100, 128) == (300, 100)
    assert epoch_windows(1, 20, 128) == (6, 122)
    assert epoch_windows(0, 5, 128) == (0, 128) and epoch_windows(5, 0, 128) == (128, 0)
    assert epoch_windows(6, 3, 0) == (6, 3) and epoch_windows(0, 0, 128) == (0, 0)
    assert epoch_windows(1, 400, 128) == (1, 400)


def _states_equal(a: dict, b: dict) -> None:
    for part in ("model", "average"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [e["val_f1"] for e in a["progress"]["curve"]] == [e["val_f1"] for e in b["progress"]["curve"]]


def test_a_training_killed_mid_epoch_resumes_where_it_stopped(chips_dir, tmp_path, monkeypatch, caplog):
    """With a state saved every step, a training killed in the middle of its second epoch resumes at the next
    step of that epoch and ends with the weights, average and curve of an uninterrupted one."""
    import minemap.train as T

    def cfg():
        return TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3, patience=10, epoch_windows=16,
                           checkpoint_steps=1)

    train(chips_dir, tmp_path / "straight", cfg(), progress=False, run_key="k")
    real, calls = T.segmentation_loss, {"n": 0}

    def killed_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # as a kill would: no clean-up in the training
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "segmentation_loss", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(chips_dir, tmp_path / "resumed", cfg(), progress=False, run_key="k")
    monkeypatch.setattr(T, "segmentation_loss", real)
    saved = torch.load(tmp_path / "resumed" / STATE, weights_only=False)["progress"]
    steps = len(saved["losses"])
    assert saved["epoch"] == 0 and saved["batch"] == 2 and saved["step"] == 6 and steps == 2  # 4 steps an epoch
    with caplog.at_level(logging.INFO, logger="minemap"):
        train(chips_dir, tmp_path / "resumed", cfg(), resume=True, progress=False, run_key="k")
    assert "resuming at epoch 2, step 3 of 4" in caplog.text
    _states_equal(*(torch.load(tmp_path / d / STATE, weights_only=False) for d in ("straight", "resumed")))


def test_loader_workers_do_not_change_what_is_learnt(chips_dir, tmp_path):
    """Each item's augmentation comes from its own place in the epoch: reading ahead in two processes teaches
    exactly what reading in the training's own process does."""
    for w in (0, 2):
        train(chips_dir, tmp_path / f"w{w}", TrainConfig(epochs=1, batch_size=4, epoch_windows=16, loader_workers=w),
              progress=False, run_key="k")
    _states_equal(*(torch.load(tmp_path / f"w{w}" / STATE, weights_only=False) for w in (0, 2)))


def test_fp16_training_scales_its_loss(chips_dir, tmp_path):
    card = train(chips_dir, tmp_path / "m", TrainConfig(epochs=1, batch_size=4, epoch_windows=16, precision="fp16"),
                 progress=False)
    assert card.precision == "fp16" and 0 < card.threshold < 1
    state = torch.load(tmp_path / "m" / STATE, weights_only=False)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0


def test_band_statistics_are_streamed_with_bounded_memory(monkeypatch):
    """Moments are exact over every valid pixel; percentiles come from all of them up to the sample size, and
    from an evenly thinned sample beyond it (never more than twice the size kept)."""
    import numpy as np

    from minemap import trainset

    rng = np.random.default_rng(0)
    pieces = [(rng.gamma(2, 500, (4, 64, 64)).astype(np.float32), rng.choice([0, 1, 255], (64, 64))) for _ in range(30)]
    every = np.concatenate([x[:, y != 255] for x, y in pieces], axis=1).astype(np.float64)
    acc = trainset.BandStats(4)
    for x, y in pieces:
        acc.add(x, y)
    mean, std, p99, p999 = acc.result()
    assert np.allclose(mean, every.mean(1), rtol=1e-6) and np.allclose(std, every.std(1), rtol=1e-5)
    assert np.allclose(p99, np.percentile(every, 99, axis=1)) and acc.step == 1
    monkeypatch.setattr(trainset, "STATS_SAMPLE", 5000)
    thin = trainset.BandStats(4)
    for x, y in pieces:
        thin.add(x, y)
        assert thin.kept <= 2 * 5000 + x.shape[1] * x.shape[2]
    assert thin.step > 1 and thin.n == every.shape[1]
    assert np.allclose(thin.result()[0], mean) and np.allclose(thin.result()[2], p99, rtol=0.05)


def test_several_processes_share_each_epoch(chips_dir, tmp_path):
    """Under torchrun, two CPU processes (gloo) each take half of every epoch's items in step with each other,
    and the first writes one model: half the steps of one process, the card saying two."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "minemap",
           "train", str(chips_dir), "--out", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "4",
           "--epoch-windows", "16", "--min-val-f1", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = read_card(tmp_path / "m")
    assert card.selection["processes"] == 2 and 0 < card.threshold < 1 and card.epochs_trained == 1
    # 16 windows an epoch: 8 a process, 2 steps of 4 (one process alone takes 4)
    assert torch.load(tmp_path / "m" / STATE, weights_only=False)["progress"]["step"] == 2


def test_a_chip_broken_after_the_scan_is_one_line_from_a_loader_process(chips_dir, tmp_path):
    """A chip file that breaks between the scan and its reading in a loader process: the training stops with the
    reader's one-line error naming the file, not the loader process's traceback."""
    import shutil

    import numpy as np

    from minemap.errors import InputError
    from minemap.train import _batches, worker_message
    from minemap.trainset import WindowDataset, block_pieces, scan

    copy = tmp_path / "chips"
    shutil.copytree(chips_dir, copy)
    blocks = block_pieces(copy, "train")
    scan(blocks.pieces, None, cells=True)
    broken = blocks.pieces[0].image
    with open(broken, "wb") as f:
        f.write(b"not a GeoTIFF")
    data = WindowDataset([(0, ("w", 0, 0, 0))], blocks, [], 64, None, None, np.zeros(4, np.float32),
                         np.ones(4, np.float32), 0, 0)
    loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=1)
    with pytest.raises(InputError) as err:
        list(_batches(loader))
    assert str(err.value).startswith(f"{broken}: cannot read chip") and "\n" not in str(err.value)
    assert worker_message("plain") == "plain"


def test_training_sees_the_other_years_blocks(scene, tmp_path):
    """chips.other_years: the card says which years' imagery training saw and judged; with
    train.validation_years = "shown" the epochs are chosen, and the calibration and threshold fitted, on the
    validation blocks of every year pooled, each year's figures at the one threshold beside them (their counts
    add up to the pooled ones); by default on the labels' year's alone."""
    labels, _ = read_labels([scene.labels])
    base = dict(chip_size=64, stride=32, block_size=128, background_per_positive=0.3)
    make_chips(labels, open_imagery(scene.imagery), 2019, tmp_path / "chips",
               ChipConfig(**base, other_years=[2020, 2021]))
    card = train(tmp_path / "chips", tmp_path / "model", TrainConfig(epochs=1, batch_size=8, epoch_windows=16,
                                                                     validation_years="shown"), progress=False)
    assert "the same blocks also from the imagery of 2020, 2021 (the same labels)" in card.selection["training"]
    assert card.train_year == 2019
    assert "in the labels' year and again in 2020, 2021" in card.selection["validation"]
    assert set(card.val_curve[0]["val_f1_by_year"]) == {"2019", "2020", "2021"}
    years = card.val_metrics["by_year"]
    assert list(years) == ["2019", "2020", "2021"]
    for k in ("tp", "fp", "fn", "tn"):
        assert sum(m[k] for m in years.values()) == card.val_metrics[k]
    assert all(m["tp"] + m["fn"] > 0 for m in years.values())  # each year's validation holds labelled pixels
    # the default, train.validation_years = "labels": judged on the labels' year alone
    alone = train(tmp_path / "chips", tmp_path / "alone", TrainConfig(epochs=1, batch_size=8, epoch_windows=16),
                  progress=False)
    assert alone.selection["validation"] == "blocks, wall to wall" and "by_year" not in alone.val_metrics
    assert alone.val_metrics["tp"] + alone.val_metrics["fn"] == years["2019"]["tp"] + years["2019"]["fn"]
