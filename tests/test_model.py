import json

import pytest
import torch
from transformers import SegformerConfig, SegformerModel

from minemap.errors import InputError, ModelError
from minemap.model import (ENCODERS, ModelCard, build_model, forward_logits, load_model, load_pretrained_encoder,
                           native_bf16, read_card, resolve_precision, save_model)


def _card(**kw):
    base = dict(encoder="mit-b0", bands=["red", "green", "blue", "nir"], band_mean=[1.0] * 4, band_std=[2.0] * 4,
                gsd_m=4.77, pixel_size=[4.77, 4.77], crs="EPSG:3857", chip_size=64)
    base.update(kw)
    return ModelCard(**base)


def test_build_any_band_count_one_logit():
    for bands in (3, 4, 6):
        m = build_model("mit-b0", bands).eval()
        with torch.no_grad():
            logits = m(pixel_values=torch.zeros(1, bands, 64, 64)).logits
        assert logits.shape == (1, 1, 16, 16)
    assert m.config.hidden_sizes == ENCODERS["mit-b0"]["hidden_sizes"]
    with pytest.raises(ModelError, match="unknown encoder 'mit-b9'"):
        build_model("mit-b9", 4)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("mit-b0", 4).eval()
    save_model(m, _card(threshold=0.35), tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [".minemap-output", "model.json",
                                                                      "weights.safetensors"]
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["bands"] == ["red", "green", "blue", "nir"] and card["threshold"] == 0.35
    m2, card2 = load_model(tmp_path / "model")
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(pixel_values=x).logits, m2(pixel_values=x).logits)
    assert card2.chip_size == 64


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="nope: model directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="model.json: model card missing"):
        read_card(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(_card().model_dump_json())
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelError, match="weights.safetensors: corrupt weights file"):
        load_model(tmp_path / "m")
    save_model(build_model("mit-b0", 3), _card(bands=["r", "g", "b"]), tmp_path / "m3")
    (tmp_path / "m3" / "model.json").write_text(_card().model_dump_json())  # card says 4 bands
    with pytest.raises(ModelError, match="do not fit a mit-b0 with 4 bands"):
        load_model(tmp_path / "m3")


def _pretrained_dir(tmp_path, hidden_sizes=(32, 64, 160, 256)):
    """A small RGB MiT encoder saved the way Hugging Face publishes nvidia/mit-b0 (save_pretrained)."""
    torch.manual_seed(1)
    cfg = SegformerConfig(num_channels=3, hidden_sizes=list(hidden_sizes), depths=[2, 2, 2, 2],
                          decoder_hidden_size=256)
    enc = SegformerModel(cfg)
    enc.save_pretrained(tmp_path / "mit-b0")
    return tmp_path / "mit-b0", enc


def _first_conv(state, bands):
    return next(k for k, v in state.items() if v.ndim == 4 and v.shape[1] == bands and "patch_embeddings" in k)


def test_pretrained_encoder_loaded_and_adapted_to_four_bands(tmp_path):
    path, enc = _pretrained_dir(tmp_path)
    model = build_model("mit-b0", 4)
    n = load_pretrained_encoder(model, path)
    src = enc.state_dict()
    dst = model.segformer.state_dict()
    assert n == len(dst)
    first = _first_conv(dst, 4)
    for key in dst:
        if key != first:
            assert torch.equal(src[key], dst[key]), key
    w_src, w_dst = src[first], dst[first]
    assert w_src.shape[1] == 3 and w_dst.shape[1] == 4
    assert torch.allclose(w_dst[:, :3], w_src * 3 / 4)
    assert torch.allclose(w_dst[:, 3], w_src.mean(1) * 3 / 4)
    # the bare weights file works too
    model2 = build_model("mit-b0", 4)
    load_pretrained_encoder(model2, path / "model.safetensors")
    assert torch.equal(model2.segformer.state_dict()[first], w_dst)


def test_pretrained_errors(tmp_path):
    with pytest.raises(ModelError, match="not found locally.*huggingface-cli download nvidia/mit-b0"):
        load_pretrained_encoder(build_model("mit-b0", 4), tmp_path / "missing")
    path, _ = _pretrained_dir(tmp_path, hidden_sizes=(64, 128, 320, 512))  # mit-b1 sized
    with pytest.raises(ModelError, match="encoder size differs"):
        load_pretrained_encoder(build_model("mit-b0", 4), path)
    torch.save({"state_dict": {"backbone.layers.0.0.projection.weight": torch.zeros(1)}}, tmp_path / "mmseg.pth")
    with pytest.raises(ModelError, match="an MMSegmentation checkpoint"):
        load_pretrained_encoder(build_model("mit-b0", 4), tmp_path / "mmseg.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.pth: not a readable checkpoint"):
        load_pretrained_encoder(build_model("mit-b0", 4), tmp_path / "bad.pth")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if native_bf16(cpu) else None)
    assert resolve_precision("fp16", cpu) is torch.float16
    # a GPU without native bfloat16 gets float16 (training scales its loss), never emulated bfloat16
    assert resolve_precision("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
    with pytest.raises(InputError, match="precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_bf16_forward_is_float32_and_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("mit-b0", 4).eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        full = forward_logits(model, x)
        half = forward_logits(model, x, torch.bfloat16)
    assert full.shape == half.shape == (2, 64, 64) and half.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: logits agree to a few hundredths of their spread, not exactly
    assert not torch.equal(full, half)
    assert (full - half).abs().max() < 0.05 * full.std() + 1e-3


def test_fine_head_starts_as_segformer_and_learns_at_full_resolution(tmp_path):
    """head="fine": logits at the input's resolution; untrained, its correction is zero, so it gives what the same
    SegFormer gives upsampled; a few steps on a mask one pixel wide (a line the quarter-resolution head cannot
    draw) fit it better than SegFormer's head does from the same start; saved and loaded as any model."""
    torch.manual_seed(0)
    fine = build_model("mit-b0", 4, "fine").eval()
    plain = build_model("mit-b0", 4).eval()
    plain.load_state_dict({k: v for k, v in fine.state_dict().items() if not k.startswith(("fine.", "fuse."))})
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert fine(pixel_values=x).logits.shape == (2, 1, 64, 64)
        assert torch.allclose(forward_logits(fine, x), forward_logits(plain, x), atol=1e-6)
    # a one-pixel-wide line every 8 px: learnable only below the head's 4 px cells
    y = torch.zeros(2, 64, 64)
    y[:, :, ::8] = 1
    xs = x.clone()
    xs[:, 0] += 3 * y  # the line shows in the first band
    losses = {}
    for name, m in (("fine", fine), ("segformer", plain)):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(40):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward_logits(m, xs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = float(loss.detach())
    assert losses["fine"] < 0.5 * losses["segformer"], losses
    save_model(fine.eval(), _card(head="fine"), tmp_path / "model")
    loaded, card = load_model(tmp_path / "model")
    assert card.head == "fine" and type(loaded).__name__ == "FineSegformer"
    with torch.no_grad():
        assert torch.equal(forward_logits(fine, xs), forward_logits(loaded, xs))
    with pytest.raises(ModelError, match="do not fit"):  # a fine model's weights are not a plain SegFormer's
        save_model(fine, _card(head="segformer"), tmp_path / "wrong")
        load_model(tmp_path / "wrong")
