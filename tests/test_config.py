import pytest

from minemap.config import load_config, parse_years
from minemap.errors import InputError


def test_parse_years():
    assert parse_years("2019-2021") == [2019, 2020, 2021]
    assert parse_years("2016,2019-2020") == [2016, 2019, 2020]
    assert parse_years(2020) == [2020]
    for bad in ("2021-2019", "19", "next year"):
        with pytest.raises(InputError, match="years"):
            parse_years(bad)


def test_toml_with_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        'labels = "l.gpkg"\nimagery = "tiles"\ntrain_year = 2019\nyears = "2019-2020"\nout = "out"\n'
        "[train]\nepochs = 3\n[vectorize]\nmin_area_m2 = 50\n")
    cfg = load_config(tmp_path / "run.toml", **{"train.epochs": 5, "years": None})
    assert cfg.labels == [tmp_path / "l.gpkg"] and cfg.imagery.source == "local"
    assert cfg.imagery.path == tmp_path / "tiles"
    assert cfg.years == [2019, 2020] and cfg.train.epochs == 5 and cfg.vectorize.min_area_m2 == 50


def test_imagery_table_and_a_trained_model(tmp_path):
    """``imagery`` as a table names its source; with ``model.path`` no labels or training year are needed; paths
    in a file are relative to it; a bare --imagery path overrides the table as the local source."""
    (tmp_path / "map.toml").write_text(
        'years = "2022-2023"\nout = "out"\n[imagery]\nsource = "local"\npath = "tiles"\n'
        '[model]\npath = "models/ghana"\n')
    cfg = load_config(tmp_path / "map.toml")
    assert cfg.imagery.path == tmp_path / "tiles" and cfg.model.path == tmp_path / "models" / "ghana"
    assert cfg.labels == [] and cfg.train_year is None
    assert load_config(tmp_path / "map.toml", imagery="other").imagery.path.name == "other"
    with pytest.raises(InputError, match="imagery: Input tag 'ftp' found using 'source' does not match any of the expected tags: 'local', 'stac', 'planet'"):
        load_config(None, imagery={"source": "ftp", "path": "x"}, years="2019", out="o", **{"model.path": "m"})
    with pytest.raises(InputError, match="imagery.local.cloud: Extra inputs"):
        load_config(None, imagery={"source": "local", "path": "x", "cloud": 1}, years="2019", out="o",
                    **{"model.path": "m"})
    with pytest.raises(InputError, match="train_year is needed with labels"):
        load_config(None, labels="l.gpkg", imagery="i", years="2019", out="o")


def test_bad_configs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("labels = [unclosed\n")
    with pytest.raises(InputError, match="broken.toml: not a valid TOML file"):
        load_config(tmp_path / "broken.toml")
    (tmp_path / "typo.toml").write_text('labels = "l"\nimagery = "i"\ntrain_year = 2019\nyears = 2019\nout = "o"\n'
                                        "[train]\nepochz = 3\n")
    with pytest.raises(InputError, match=r"typo.toml: invalid configuration: train.epochz: Extra inputs"):
        load_config(tmp_path / "typo.toml")
    with pytest.raises(InputError, match="invalid configuration: .*labels are needed to train a model"):
        load_config(None, imagery="i", train_year=2019, years="2019", out="o")
