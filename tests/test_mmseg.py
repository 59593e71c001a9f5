"""MMSegmentation SegFormer checkpoints: export a model to MMSegmentation's key names, import it back, and get
the same logits; two classes become one logit; bad checkpoints fail in one line."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from minemap.cli import app
from minemap.errors import ModelError
from minemap.mmseg import from_mmseg, import_mmseg, to_mmseg
from minemap.model import build_model, forward_logits, load_model


def _random_mmseg_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("mit-b0", 3, head="mmseg").eval()
    with torch.no_grad():  # batch norm statistics away from their defaults, so that folding them matters
        bn = model.decode_head.batch_norm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model


def test_export_then_import_gives_the_same_logits(tmp_path):
    model = _random_mmseg_model()
    state = to_mmseg(model)
    assert "backbone.layers.0.1.0.attn.attn.in_proj_weight" in state and state["decode_head.conv_seg.weight"].shape[0] == 2
    # an equivalent checkpoint whose stage projections carry a real batch norm: scale each conv's output channels
    # by k and let the batch norm undo it, as a trained MMSegmentation model would hold them
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        c = f"decode_head.convs.{i}"
        k = 0.5 + torch.rand(state[f"{c}.conv.weight"].shape[0], generator=g)
        shift = torch.randn(k.shape, generator=g)
        state[f"{c}.conv.weight"] = state[f"{c}.conv.weight"] * k[:, None, None, None]
        state[f"{c}.bn.running_mean"] = shift * k
        state[f"{c}.bn.running_var"] = k ** 2 * 1.0 - 1e-5
        state[f"{c}.bn.bias"] = state[f"{c}.bn.bias"] + shift
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": state}, tmp_path / "segformer.pth")
    card = import_mmseg(tmp_path / "segformer.pth", tmp_path / "model", ["red", "green", "blue"], [0.0] * 3, [1.0] * 3,
                        gsd_m=4.77)
    assert card.encoder == "mit-b0" and card.head == "mmseg"
    back, _ = load_model(tmp_path / "model")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(forward_logits(model, x), forward_logits(back, x), atol=1e-4)


def test_two_classes_become_one_logit():
    """softmax(z)[1] == sigmoid(z1 - z0): the imported logit gives the two-class model's P(mining)."""
    model = _random_mmseg_model(3)
    state = to_mmseg(model)
    g = torch.Generator().manual_seed(2)
    state["decode_head.conv_seg.weight"] = torch.randn(state["decode_head.conv_seg.weight"].shape, generator=g)
    state["decode_head.conv_seg.bias"] = torch.randn(2, generator=g)
    one = build_model("mit-b0", 3, head="mmseg").eval()
    one.load_state_dict(from_mmseg(state, one))
    two = build_model("mit-b0", 3, head="mmseg").eval()
    two.config.num_labels = 2
    two.decode_head.classifier = torch.nn.Conv2d(256, 2, 1)
    weights = from_mmseg(state, one)
    weights["decode_head.classifier.weight"] = state["decode_head.conv_seg.weight"]
    weights["decode_head.classifier.bias"] = state["decode_head.conv_seg.bias"]
    two.load_state_dict(weights)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p_two = torch.softmax(two(pixel_values=x).logits, 1)[:, 1]
        p_one = torch.sigmoid(one(pixel_values=x).logits[:, 0])
    assert torch.allclose(p_one, p_two, atol=1e-5)


def test_bad_checkpoints_fail_in_one_line(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pth: not a readable PyTorch checkpoint"):
        import_mmseg(tmp_path / "junk.pth", tmp_path / "m", ["r"], [0], [1], 4.77)
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="other.pth: not an MMSegmentation SegFormer checkpoint"):
        import_mmseg(tmp_path / "other.pth", tmp_path / "m", ["r"], [0], [1], 4.77)
    torch.save({"state_dict": to_mmseg(_random_mmseg_model())}, tmp_path / "ok.pth")
    with pytest.raises(ModelError, match="the model takes 3 bands; 4 bands given"):
        import_mmseg(tmp_path / "ok.pth", tmp_path / "m", ["r", "g", "b", "n"], [0] * 4, [1] * 4, 4.77)
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "not a readable PyTorch checkpoint" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(tmp_path / "ok.pth"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model.json").is_file() and not (tmp_path / "m" / "train_state.pt").exists()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the test's own PNGs
def test_chips_round_trip_through_the_study_layout(scene, tmp_path):
    """`chips --format mmseg` writes img_dir/ann_dir per split; `train` reads that layout (here: the study's own
    kind, 8-bit RGB PNGs with 0/1/255 masks, too) as chips."""
    import numpy as np
    import rasterio

    args = ["chips", "--labels", str(scene.labels), "--imagery", str(scene.imagery), "--year", "2019", "--out",
            str(tmp_path / "chips"), "--chip-size", "64", "--stride", "32", "--block-size", "128", "--format", "mmseg"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    year = tmp_path / "chips" / "mmseg" / "2019"
    imgs = {p.stem for p in (year / "img_dir").rglob("*.tif")}
    anns = {p.stem for p in (year / "ann_dir").rglob("*.png")}
    assert imgs and imgs == anns and {p.name for p in (year / "img_dir").iterdir()} == {"train", "val", "test"}
    with rasterio.open(next((year / "ann_dir" / "train").glob("*.png"))) as m:
        assert set(np.unique(m.read(1))) <= {0, 1, 255}
    # the study's chips: RGB PNGs
    study = tmp_path / "segmentation" / "2019"
    for p in (year / "img_dir").rglob("*.tif"):
        split = p.parent.name
        with rasterio.open(p) as src:
            rgb = np.clip(src.read([1, 2, 3]) / 10, 0, 255).astype(np.uint8)
        dest = study / "img_dir" / split / f"{p.stem}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dest, "w", driver="PNG", width=rgb.shape[2], height=rgb.shape[1], count=3,
                           dtype="uint8") as dst:
            dst.write(rgb)
        (study / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        (study / "ann_dir" / split / f"{p.stem}.png").write_bytes((year / "ann_dir" / split / f"{p.stem}.png").read_bytes())
    r = CliRunner().invoke(app, ["train", str(study), "--out", str(tmp_path / "model"), "--epochs", "1",
                                 "--bands", "red,green,blue", "--accept-weak-model"])
    assert r.exit_code == 0, r.output
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["bands"] == ["red", "green", "blue"] and card["chip_size"] == 64 and card["train_year"] == 2019
    assert card["splits"]["train"]["chips"] == len(list((study / "img_dir" / "train").glob("*.png")))
    (study / "ann_dir" / "val" / next((study / "ann_dir" / "val").glob("*.png")).name).unlink()
    r = CliRunner().invoke(app, ["train", str(study), "--out", str(tmp_path / "model2"), "--epochs", "1"])
    assert r.exit_code == 2 and "no mask ann_dir/val/" in r.output


class HistoryBuffer:  # stands for mmengine's logging objects, pickled beside the weights in its checkpoints
    def __init__(self):
        self.max_length = 10
        self._log_history = np.array([1.0, 2.0])
        self._count_history = np.array([1, 1])

    def __setstate__(self, state):  # would run if the class were ever resolved: it must not be
        raise AssertionError("a checkpoint's class was run")


def _save_as_mmengine(obj, path, monkeypatch):
    """torch.save ``obj`` with :class:`HistoryBuffer` pickled under mmengine's name (as a real training
    checkpoint names it); the stand-in modules are gone again before the file is read."""
    import sys
    import types

    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    with monkeypatch.context() as m:
        for name in names:
            m.setitem(sys.modules, name, types.ModuleType(name))
        m.setattr(HistoryBuffer, "__module__", "mmengine.logging.history_buffer")
        m.setattr(sys.modules["mmengine.logging.history_buffer"], "HistoryBuffer", HistoryBuffer, raising=False)
        torch.save(obj, path)
    assert "mmengine" not in sys.modules


def test_mmengine_checkpoints_and_wide_heads_import(tmp_path, monkeypatch):
    """A training checkpoint of mmengine carries its own classes (read inertly, never run) and numpy values,
    and MMSegmentation's mit-b2..b5 keep a 256-channel head (transformers' default is 768): both import, with
    equal logits."""
    torch.manual_seed(4)
    model = build_model("mit-b2", 3, head="mmseg", decoder_channels=256).eval()
    _save_as_mmengine({"meta": {"mmseg_version": "1.2.2", "seed": np.int64(3), "dataset_meta": {
        "classes": ("background", "mining"), "palette": [[0, 0, 0], [255, 0, 0]]}},
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"best_score": np.float64(0.8)}},
        "state_dict": to_mmseg(model)}, tmp_path / "iter_160000.pth", monkeypatch)
    with pytest.raises(Exception):
        torch.load(tmp_path / "iter_160000.pth", weights_only=True)  # what a plain weights-only load makes of it
    card = import_mmseg(tmp_path / "iter_160000.pth", tmp_path / "m", ["red", "green", "blue"], [0.0] * 3,
                        [1.0] * 3, gsd_m=4.77)
    assert card.encoder == "mit-b2" and card.decoder_channels == 256
    back, _ = load_model(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(forward_logits(model, x), forward_logits(back, x), atol=1e-4)


class _RunsSource:  # a checkpoint that reduces to a torch helper which executes source
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        from torch.fx.graph_module import _exec_with_source

        return _exec_with_source, (f"open({self.marker!r}, 'w').write('ran')", {})


class _RunsShell:  # ... or to os.system
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _OtherProgram:  # ... or to a class of another program
    pass


def test_a_checkpoint_that_names_code_is_refused_and_never_run(tmp_path, monkeypatch):
    """A checkpoint is a pickle, and a pickle calls what it names: a file naming a torch helper that executes
    source, os.system or another program's class is refused in one line naming that global, and its code does
    not run (the same payload does run where a file is unpickled without an allow-list)."""
    state = to_mmseg(_random_mmseg_model())
    live = tmp_path / "live"
    torch.save({"meta": {}, "state_dict": state, "x": _RunsSource(live)}, tmp_path / "proof.pth")
    torch.load(tmp_path / "proof.pth", weights_only=False)  # the payload is real: an unrestricted load runs it
    assert live.read_text() == "ran"
    cases = {"fx.pth": (_RunsSource, r"torch\.fx\.graph_module\._exec_with_source"),
             "shell.pth": (_RunsShell, r"(posix|nt|os)\.system"),
             "other.pth": (lambda marker: _OtherProgram(), r"test_mmseg\._OtherProgram")}
    for name, (make, refused) in cases.items():
        marker = tmp_path / f"{name}.ran"
        torch.save({"meta": {}, "state_dict": state, "message_hub": {"x": make(marker)}}, tmp_path / name)
        with pytest.raises(ModelError, match=rf"{name}: refused: the checkpoint names {refused}, which is not "):
            import_mmseg(tmp_path / name, tmp_path / "m", ["r", "g", "b"], [0] * 3, [1] * 3, 4.77)
        assert not marker.exists(), name
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(tmp_path / "fx.pth"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "refused: the checkpoint names torch.fx.graph_module._exec_with_source" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "fx.pth.ran").exists()
    # the module-prefix rule this replaces let any torch.* global through, as the fx helper above: the allow-list
    # adds exact names, none of them torch's (torch's own weights-only set covers tensors and storages)
    from minemap import mmseg

    names = [g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in mmseg._safe_globals()]
    assert names and not [n for n in names if n.startswith("torch")]
