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
    assert cfg.labels == [tmp_path / "l.gpkg"] and cfg.imagery == tmp_path / "tiles"
    assert cfg.years == [2019, 2020] and cfg.train.epochs == 5 and cfg.vectorize.min_area_m2 == 50


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
    with pytest.raises(InputError, match="invalid configuration: labels: Field required"):
        load_config(None, imagery="i", train_year=2019, years="2019", out="o")
