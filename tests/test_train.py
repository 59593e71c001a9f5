import logging

import pytest
import torch

from minemap.chips import make_chips
from minemap.config import ChipConfig, ModelConfig, TrainConfig
from minemap.errors import InputError
from minemap.imagery import open_imagery
from minemap.labels import read_labels
from minemap.model import read_card
from minemap.train import STATE, segmentation_loss, train


@pytest.fixture(scope="module")
def chips_dir(scene, tmp_path_factory):
    dest = tmp_path_factory.mktemp("chips") / "chips"
    labels, _ = read_labels([scene.labels])
    make_chips(labels, open_imagery(scene.imagery), 2019, dest,
               ChipConfig(chip_size=64, stride=32, block_size=128, background_per_positive=0.3))
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
    state = torch.load(tmp_path / "model" / STATE, weights_only=False)
    assert state["epoch"] == 1
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
