"""Never lose a user's files: output folders (chips, models, the MMSegmentation layout) replace only what minemap
wrote, through the Python API and the CLI (one line, exit code 2); the swap leaves no stale temporaries behind;
readers skip the temporaries of files being written. Planet's partial downloads, key and quad ids: test_planet.py."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import torch
from affine import Affine
from typer.testing import CliRunner

from minemap import _io
from minemap._io import MARKER, atomic_path, check_output_dir, is_temporary, outputs
from minemap.cli import app
from minemap.errors import MinemapError, OutputError

THESIS = "four years of work"


def _users_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text(THESIS)
    (path / "data.csv").write_text("a,b\n")
    return path


def _one_line_exit_2(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    for needle in needles:
        assert needle in r.output, r.output


def _no_temporaries(folder):
    return [p for p in folder.rglob("*") if is_temporary(p.name)]


# -- the rule, on its own ----------------------------------------------------------------------------------------
def test_which_folders_may_be_replaced(tmp_path):
    check_output_dir(tmp_path / "new", "chips")  # absent
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0")  # a file browser's litter is no one's work
    check_output_dir(tmp_path / "empty", "model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", "chips")
    mine = _users_folder(tmp_path / "mine")
    with pytest.raises(OutputError) as e:
        check_output_dir(mine, "model")
    assert str(e.value) == (f"{mine}: not a minemap output folder (holds data.csv, thesis.txt); give an empty or "
                            "new folder")
    assert isinstance(e.value, MinemapError)

    # written by a minemap older than the marker: known by its files and what they hold
    old_chips = tmp_path / "old_chips"
    (old_chips / "images").mkdir(parents=True)
    (old_chips / "index.parquet").write_bytes(b"PAR1")
    (old_chips / "meta.json").write_text(json.dumps({"year": 2019, "chip_size": 64}))
    check_output_dir(old_chips, "chips")
    with pytest.raises(OutputError, match="not a minemap output folder"):
        check_output_dir(old_chips, "model")
    (old_chips / "meta.json").write_text(json.dumps({"my": "own meta"}))  # the same names, someone else's files
    with pytest.raises(OutputError, match="not a minemap output folder"):
        check_output_dir(old_chips, "chips")
    old_model = tmp_path / "old_model"
    old_model.mkdir()
    (old_model / "model.json").write_text(json.dumps({"encoder": "mit-b0"}))
    (old_model / "weights.safetensors").write_bytes(b"w")
    check_output_dir(old_model, "model")
    (old_model / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files minemap did not write \(notes.txt\)"):
        check_output_dir(old_model, "model")
    layout = tmp_path / "layout"  # an MMSegmentation layout looks like anyone's dataset: only with the marker
    (layout / "img_dir").mkdir(parents=True)
    with pytest.raises(OutputError, match="not a minemap output folder"):
        check_output_dir(layout, "mmseg")

    # with the marker: its kind, and nothing at its top level but what it names
    with atomic_path(tmp_path / "out", kind="model") as tmp:
        (tmp / "model.json").write_text("{}")
        (tmp / "extra.bin").write_bytes(b"x")
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["kind"] == "model" and marker["files"] == ["extra.bin", "model.json"] and marker["version"]
    check_output_dir(tmp_path / "out", "model")
    with pytest.raises(OutputError, match="holds minemap's model output, not chips"):
        check_output_dir(tmp_path / "out", "chips")
    (tmp_path / "out" / "train_state.pt").write_bytes(b"s")  # written there by training, after the swap
    check_output_dir(tmp_path / "out", "model")
    (tmp_path / "out" / "thesis.txt").write_text(THESIS)
    with pytest.raises(OutputError, match=r"holds files minemap did not write \(thesis.txt\); move them away"):
        check_output_dir(tmp_path / "out", "model")


def test_folder_swap_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path, monkeypatch):
    dest = tmp_path / "chips"
    for n in (1, 2):
        with atomic_path(dest, kind="chips") as tmp:
            assert tmp.is_dir() and (tmp / MARKER).is_file() and is_temporary(tmp.name)
            (tmp / "index.parquet").write_text(f"v{n}")
    assert (dest / "index.parquet").read_text() == "v2"
    with pytest.raises(RuntimeError):
        with atomic_path(dest, kind="chips") as tmp:
            (tmp / "index.parquet").write_text("half")
            raise RuntimeError("killed")
    assert (dest / "index.parquet").read_text() == "v2"  # a failed write leaves the previous folder
    # where the file system cannot swap two folders in one step: old one aside, new one in, old one dropped
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    with atomic_path(dest, kind="chips") as tmp:
        (tmp / "index.parquet").write_text("v3")
    assert (dest / "index.parquet").read_text() == "v3"
    assert not _no_temporaries(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["chips"]
    # a folder without a kind replaces one only where it writes each of its names anew
    plain = tmp_path / "study"
    for years in ((2019, 2020), (2019, 2020, 2021)):
        with atomic_path(plain) as tmp:
            tmp.mkdir()
            for y in years:
                (tmp / f"{y}.gpkg").write_text(str(years))
    (plain / "thesis.txt").write_text(THESIS)
    with pytest.raises(OutputError, match=r"study: holds files this output would not write anew \(thesis.txt\)"):
        with atomic_path(plain) as tmp:
            tmp.mkdir()
            for y in (2019, 2020, 2021):
                (tmp / f"{y}.gpkg").write_text("new")
    assert (plain / "thesis.txt").read_text() == THESIS and (plain / "2021.gpkg").is_file()
    assert not _no_temporaries(tmp_path)


def test_stale_temporaries_are_cleaned_only_when_marked_and_abandoned(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    dest = tmp_path / "model"
    abandoned = tmp_path / ".model.0123abcd.tmp"  # a writer killed mid-write: marked, unlocked
    abandoned.mkdir()
    (abandoned / MARKER).write_text('{"kind": "model"}')
    (abandoned / "weights.safetensors").write_bytes(b"half")
    old = tmp_path / ".model.89abcdef.old"  # killed between the two renames of a swap
    old.mkdir()
    (old / MARKER).write_text('{"kind": "model", "files": []}')
    unmarked = tmp_path / ".model.deadbeef.tmp"  # no marker: not known to be minemap's, left alone
    unmarked.mkdir()
    (unmarked / "x").write_text("?")
    live = tmp_path / ".model.feedf00d.tmp"  # a writer at work: its marker is locked
    live.mkdir()
    (live / MARKER).write_text('{"kind": "model"}')
    with open(live / MARKER) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with atomic_path(dest, kind="model") as tmp:
            (tmp / "model.json").write_text("{}")
        assert live.is_dir()
    assert not abandoned.exists() and not old.exists()
    assert unmarked.is_dir() and (unmarked / "x").read_text() == "?"
    assert (dest / "model.json").is_file()


# -- the stages, through the API and the CLI ---------------------------------------------------------------------
def _chips_args(scene, out):
    return ["chips", "--labels", str(scene.labels), "--imagery", str(scene.imagery), "--year", "2019", "--out",
            str(out), "--chip-size", "64", "--stride", "32", "--block-size", "128"]


def test_chips_never_replace_a_users_folder(scene, tmp_path):
    from minemap.chips import make_chips
    from minemap.config import ChipConfig
    from minemap.imagery import open_imagery
    from minemap.labels import read_labels
    from minemap.mmseg import write_layout

    mine = _users_folder(tmp_path / "mine")
    r = CliRunner().invoke(app, _chips_args(scene, mine))
    _one_line_exit_2(r, "not a minemap output folder", "thesis.txt", "give an empty or new folder")
    assert (mine / "thesis.txt").read_text() == THESIS and sorted(p.name for p in mine.iterdir()) == \
        ["data.csv", "thesis.txt"]

    labels, _ = read_labels([scene.labels])
    source = open_imagery(scene.imagery)
    cfg = ChipConfig(chip_size=64, stride=32, block_size=128)
    with pytest.raises(OutputError, match="not a minemap output folder"):
        make_chips(labels, source, 2019, mine, cfg)
    assert (mine / "thesis.txt").read_text() == THESIS

    chips = tmp_path / "chips"
    first = make_chips(labels, source, 2019, chips, cfg)
    assert json.loads((chips / MARKER).read_text())["kind"] == "chips"
    r = CliRunner().invoke(app, _chips_args(scene, chips) + ["--format", "mmseg"])  # its own folder: replaced
    assert r.exit_code == 0, r.output
    assert len(first) == len(outputs(chips / "images", "*.tif")) and (chips / "mmseg" / "2019" / MARKER).is_file()
    # the layout of the study: a user's dataset at its place is not replaced either
    dataset = _users_folder(tmp_path / "layout" / "2019")
    with pytest.raises(OutputError, match="not a minemap output folder"):
        write_layout(chips, tmp_path / "layout")
    assert (dataset / "thesis.txt").read_text() == THESIS
    (chips / "notes.txt").write_text("my notes on these chips")
    r = CliRunner().invoke(app, _chips_args(scene, chips))
    _one_line_exit_2(r, "holds files minemap did not write (notes.txt)")
    assert (chips / "notes.txt").is_file() and (chips / "index.parquet").is_file()
    assert not _no_temporaries(tmp_path)


def _mmseg_checkpoint(path):
    from minemap.mmseg import to_mmseg
    from minemap.model import build_model

    torch.manual_seed(0)
    torch.save({"state_dict": to_mmseg(build_model("mit-b0", 3, head="mmseg").eval())}, path)
    return path


def test_models_never_replace_a_users_folder(tmp_path):
    from minemap.mmseg import import_mmseg
    from minemap.model import load_model

    ckpt = _mmseg_checkpoint(tmp_path / "segformer.pth")
    mine = _users_folder(tmp_path / "models")
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(ckpt), "--out", str(mine)])
    _one_line_exit_2(r, f"{mine}: not a minemap output folder (holds data.csv, thesis.txt)")
    assert (mine / "thesis.txt").read_text() == THESIS
    with pytest.raises(OutputError, match="not a minemap output folder"):
        import_mmseg(ckpt, mine, ["red", "green", "blue"], [0.0] * 3, [1.0] * 3, 4.77)
    assert sorted(p.name for p in mine.iterdir()) == ["data.csv", "thesis.txt"]

    model = tmp_path / "model"
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(ckpt), "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert json.loads((model / MARKER).read_text())["kind"] == "model"
    stamp = (model / "weights.safetensors").stat().st_ino
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(ckpt), "--out", str(model), "--chip-size", "256"])
    assert r.exit_code == 0, r.output  # minemap's own model folder: replaced
    assert (model / "weights.safetensors").stat().st_ino != stamp and load_model(model)[1].chip_size == 256
    (model / MARKER).unlink()  # as an older minemap wrote it: still known by its model card
    import_mmseg(ckpt, model, ["red", "green", "blue"], [0.0] * 3, [1.0] * 3, 4.77, chip_size=128)
    assert load_model(model)[1].chip_size == 128 and (model / MARKER).is_file()
    r = CliRunner().invoke(app, ["model", "import-mmseg", str(ckpt), "--out", str(mine / "x")])
    assert r.exit_code == 0 and (mine / "x" / "model.json").is_file()  # a new folder inside one's own: fine
    assert not _no_temporaries(tmp_path)


# -- readers skip temporaries ------------------------------------------------------------------------------------
def test_vectorize_ignores_a_tile_left_half_written(tmp_path):
    from minemap.lattice import Grid
    from minemap.formats.rasters import write_cog
    from minemap.vectorize import vectorize

    q = np.zeros((64, 64), np.uint8)
    q[10:40, 20:50] = 200
    write_cog(tmp_path / "prob" / "2020" / "r000_c000.tif", q, Grid("EPSG:3857", Affine(4.0, 0, 0, 0, -4.0, 0), 64, 64))
    from minemap.config import VectorizeConfig

    square = VectorizeConfig(max_rectangularity=1)  # a square pit: shape does not decide here
    before = vectorize(tmp_path / "prob", [2020], tmp_path / "poly", 0.5, square)
    # a worker killed while writing a tile leaves its temporary beside the tiles: half a GeoTIFF
    (tmp_path / "prob" / "2020" / ".r000_c001.tif.1a2b3c4d.tmp.tif").write_bytes(b"II*\0" + b"\0" * 40)
    (tmp_path / "prob" / "2020" / "._r000_c000.tif").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    after = vectorize(tmp_path / "prob", [2020], tmp_path / "poly2", 0.5, square)
    a, b = (gpd.read_parquet(p[2020]).area_km2.round(9).tolist() for p in (before, after))
    assert a == b and len(a) == 1
    assert outputs(tmp_path / "prob" / "2020", "*.tif") == [tmp_path / "prob" / "2020" / "r000_c000.tif"]
    assert outputs(tmp_path / "nowhere", "*.tif") == []
    assert is_temporary(".r000_c001.tif.1a2b3c4d.tmp.tif") and is_temporary(".model.0123abcd.old")
    assert not is_temporary("r000_c001.tif") and not is_temporary(".thesis.txt")
