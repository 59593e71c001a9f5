from pathlib import Path

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


def _path_keys(model, prefix=""):
    """Every dotted key of the settings whose field holds paths (the imagery sources' tables each)."""
    from minemap.config import _sections
    from minemap.settings import holds_paths

    out = []
    for name, field in model.model_fields.items():
        subs = _sections(field.annotation)
        if subs:
            for sub in subs:
                out += [(sub, k) for _, k in _path_keys(sub, f"{prefix}{name}.")]
        elif holds_paths(field.annotation):
            out.append((model, prefix + name))
    return out


def test_every_path_in_a_config_is_relative_to_its_folder(tmp_path, monkeypatch):
    """One rule for every path key, in every table: relative to the config's folder, whatever the working
    directory (countries, verdicts and the pretrained checkpoint used to follow the working directory)."""
    from minemap.config import RunConfig
    from minemap.imagery.local import LocalImageryConfig
    from minemap.imagery.planet import PlanetImageryConfig
    from minemap.imagery.stac import StacImageryConfig

    keys = _path_keys(RunConfig)
    names = {k for _, k in keys}
    # the keys the rule must reach (a new path key is found by the walk and checked below as well)
    assert {"labels", "out", "reference", "model.path", "model.pretrained", "postprocess.countries",
            "review.verdicts", "imagery.path", "imagery.cache_dir"} <= names
    conf = tmp_path / "conf"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for source in (LocalImageryConfig, StacImageryConfig, PlanetImageryConfig):
        tables: dict[str, dict] = {}
        top = {"train_year": 2019, "years": "2019"}
        for model, key in keys:
            if key.startswith("imagery.") and model is not source:
                continue
            *parents, leaf = key.split(".")
            node = tables.setdefault(parents[0], {}) if parents else top
            node[leaf] = [f"rel/{leaf}.gpkg"] if key == "labels" else f"rel/{leaf}"
        imagery = tables.setdefault("imagery", {})
        imagery["source"] = source.model_fields["source"].default
        if source is not LocalImageryConfig:  # the remote sources need an area and, for STAC, an API
            imagery["bbox"] = [-2.0, 5.0, -1.9, 5.1]
        if source is StacImageryConfig:
            imagery["url"] = "https://example.org/stac/v1"
        lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        (conf / "run.toml").write_text("\n".join(lines) + "\n")
        cfg = load_config(conf / "run.toml")
        for model, key in keys:
            if key.startswith("imagery.") and model is not source:
                continue
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            for v in value if isinstance(value, list) else [value]:
                assert v.is_absolute() and v.parent == conf / "rel", (source.__name__, key, v)


def _toml(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else str(v)


def test_flags_stay_relative_to_the_working_directory(tmp_path):
    (tmp_path / "run.toml").write_text('labels = "l.gpkg"\nimagery = "tiles"\ntrain_year = 2019\nyears = "2019"\nout = "out"\n')
    cfg = load_config(tmp_path / "run.toml", **{"postprocess.countries": "c.gpkg", "out": "flag-out"})
    assert str(cfg.postprocess.countries) == "c.gpkg" and str(cfg.out) == "flag-out"
    assert cfg.imagery.path == tmp_path / "tiles" and cfg.labels == [tmp_path / "l.gpkg"]


def test_a_config_given_by_a_relative_path_resolves_each_path_once(tmp_path, monkeypatch):
    """From `minemap run configs/run.toml`: the config's folder is relative, and every path, in the imagery
    source's table too, is joined to it once."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.toml").write_text(
        'labels = "l.gpkg"\ntrain_year = 2019\nyears = "2019"\nout = "out"\n'
        '[imagery]\nsource = "stac"\nurl = "https://example.org/stac"\nbbox = [-2.0, 5.0, -1.9, 5.1]\n'
        'cache_dir = "cache"\n[model]\npretrained = ""\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("configs/run.toml"))
    assert cfg.imagery.cache_dir == Path("configs/cache") and cfg.out == Path("configs/out")
    assert cfg.model.pretrained is None  # an empty path is none, not the config's folder
