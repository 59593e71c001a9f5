"""Configuration of a run: pydantic models, read from TOML and overridden by CLI flags.

A TOML file mirrors :class:`RunConfig`; top-level keys plus one table per stage, for example::

    labels = ["labels.gpkg"]
    imagery = "tiff_tiles"
    train_year = 2019
    years = "2019-2021"
    out = "out"

    [train]
    epochs = 8

    [vectorize]
    min_area_m2 = 2000
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from minemap.errors import InputError
from minemap.imagery.local import LocalImageryConfig
from minemap.imagery.planet import PlanetImageryConfig
from minemap.imagery.stac import StacImageryConfig
from minemap.settings import Section, holds_paths




class ChipConfig(Section):
    chip_size: int = Field(256, ge=32, description="chip side in pixels, at the imagery's native resolution")
    stride: int | None = Field(None, description="step between chips inside a block; default chip_size // 2, "
                                                 "chip_size // 4 in blocks under four chips wide (few labels)")
    block_size: int | None = Field(None, description="side of a spatial split block in pixels; default: chosen "
                                                     "from the labels (see min_positive_blocks)")
    min_positive_blocks: int = Field(8, ge=3, description="an automatic block size gives at least this many "
                                                           "blocks holding labels")
    background_per_positive: float = Field(0.5, ge=0, description="background chips per positive chip")
    background_groups: int = Field(8, ge=1, description="background chips are drawn evenly from this many "
                                                        "groups of similar coarse spectra")
    balance_cover: bool = Field(True, description="share the scene's surfaces (land-cover groups of the training "
                                                  "year, sampled per block) among the splits in their target "
                                                  "proportions too, not only the labelled pixels")
    max_background_pool: int = Field(4000, ge=10, description="candidates whose spectra are compared")
    background_reach: int | None = Field(1, ge=0, description="background and hard-negative chips come only from "
                                                              "blocks within this many blocks of one holding a "
                                                              "label (the labelled ground): ground nobody labelled "
                                                              "may hold mines nobody drew, which it would teach "
                                                              "as background; null: from anywhere (labels known "
                                                              "to be complete over the imagery)")
    block_halo: int | None = Field(None, ge=0, description="pixels of imagery written around each block (their "
                                                           "labels left out of the loss): training windows reach "
                                                           "across a block's edge, so a field or a mine cut by it "
                                                           "is seen whole, and validation blocks are mapped with "
                                                           "the context a scene gives them; default: a quarter "
                                                           "of chip_size, at least 32 (64 px for 256 px chips)")
    ignore_border_m: float = Field(5.0, ge=0, description="width of the band along label outlines left out of "
                                                          "the loss (digitised outlines are metres off)")
    other_years: Annotated[int, Field(ge=0)] | list[int] = Field(
        2, description="training sees the training blocks in other years' imagery too, masked by the same labels "
                       "(thin clouds and shadows found in each year's own pixels left out of the loss, and the ground "
                       "that lost or gained vegetation since the labels' year: a pit that grew, a pit grown over), "
                       "so that it "
                       "learns each year's haze, season and calibration on ground it knows: a number N, the "
                       "years up to N after the labels' year that a run maps (minemap chips: that the imagery "
                       "source offers) (a mine dug stays disturbed ground; before "
                       "the labels' year it may not yet have been dug, so earlier years are not used); a list, "
                       "those years; 0 or [], none. The validation blocks are cut again from the same years (masked "
                       "alike), so the epoch kept and the calibration answer for every year the model saw; the "
                       "test blocks and a run's operating threshold stay on the labels' year")
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _train_is_largest(self) -> "ChipConfig":
        if 1 - self.val_fraction - self.test_fraction <= max(self.val_fraction, self.test_fraction):
            raise ValueError("the train split must be the largest: val_fraction + test_fraction leave too little")
        return self


class HardNegativeConfig(Section):
    """After a first fit, chips where the model fires away from the labels, then a fine-tune."""

    enabled: bool = True
    per_positive: float = Field(1.0, ge=0, description="at most this many hard-negative chips per positive chip")
    search_level: float = Field(0.1, gt=0, lt=1, description="the first model's detections are searched at this "
                                                            "calibrated probability (or its threshold, if lower): "
                                                            "below the threshold, so that confusions a high "
                                                            "threshold hides at the price of recall are found too")
    buffer_m: float = Field(60.0, ge=0, description="detections within this distance of a label are not false "
                                                     "alarms (outlines are off, mines grow)")
    max_probability: float = Field(0.9, gt=0, le=1, description="detections away from labels as sure as the median "
                                                                "detection on a label (or this, if lower) may be "
                                                                "mines the labels miss: ignored in every chip, not "
                                                                "taught as background")
    max_missed_share: float | None = Field(None, ge=0, description=(
        "possible missed mines on labelled ground may cover at most this share of the labelled area, the surest "
        "first; the rest are taught as false alarms (for labels known to miss few mines: more sure area away "
        "from them is then likelier a confusion of the first model). None (default): no cap; on two benchmark "
        "draws a cap of 0.5 did not raise the mean test F1"))
    max_rectangularity: float = Field(0.9, gt=0, le=1, description=(
        "a sure detection away from the labels whose outline fills more than this share of its smallest enclosing "
        "rectangle, and more than 99 % of the labels' outlines do, is taught as a false alarm, not spared as a "
        "possible missed mine: fields, clearings and plantation blocks are rectangles, pits, tailings and dredge "
        "ponds rarely are (the literature's mining polygons: 95 % below 0.875); detections under 64 pixels are not "
        "judged by shape. 1: shape never decides"))
    epochs: int = Field(8, ge=1, description="most epochs of the fine-tune")
    patience: int = Field(2, ge=1, description="stop the fine-tune after this many epochs without a better "
                                               "validation F1")
    keep_within: float = Field(0.01, ge=0, le=1, description=(
        "the fine-tune's weights are kept, rather than the first model's, unless their validation F1 falls more "
        "than this below the first model's: the false alarms it is taught lie mostly outside the validation "
        "blocks, which cannot reward their removal, so validation guards against harm instead of demanding a "
        "gain. 0: kept only where validation improves"))


class ModelConfig(Section):
    path: Path | None = Field(None, description="a trained model directory (weights.safetensors, model.json): map "
                                                "with it; no labels, chips or training")
    encoder: Literal["mit-b0", "mit-b1", "mit-b2", "mit-b3", "mit-b4", "mit-b5"] = "mit-b0"
    pretrained: Path | None = Field(None, description="local checkpoint (file or directory) for the encoder")
    head: Literal["segformer", "fine"] = Field(
        "segformer", description="SegFormer's head, whose logits are a quarter of the input's resolution, "
                                 "upsampled; or fine: the same refined by a small branch at full resolution "
                                 "(for mines a few pixels wide)")


class TrainConfig(Section):
    epochs: int = Field(30, ge=1, description="epochs of the schedule (with stopping = early, the most: training "
                                              "stops earlier when validation stalls)")
    patience: int = Field(8, ge=1, description="stop after this many epochs without a better validation F1 (the "
                                                "learning rate halves after half as many)")
    min_val_f1: float = Field(0.5, ge=0, le=1, description="a model below this validation F1 stops the run "
                                                           "(unless accept_weak_model)")
    min_val_pixels: int = Field(5000, ge=0, description="early stopping needs at least this many labelled pixels "
                                                        "in the validation blocks; with fewer, one chip or two "
                                                        "would choose the epoch, so training runs a fixed "
                                                        "schedule of `epochs` (the rate halved every `patience` "
                                                        "epochs) and keeps the last weights")
    stopping: Literal["early", "fixed"] = Field(
        "fixed", description="how the epoch kept is chosen (default fixed since 2026-12-07: early stopping on a "
                             "district's few validation blocks kept undertrained models, README \"The fixed "
                             "schedule by default\"): early, the best validation F1, training stopped after "
                             "`patience` epochs without a better one (a fixed schedule where the validation holds "
                             "fewer than `min_val_pixels`); fixed, every one of `epochs` run (the rate halved every "
                             "`patience`) and the last (averaged) weights kept, so a model that learns a year slowly "
                             "is never stopped in a dip; a fine-tune (review) stops early either way where "
                             "its validation can, keeping the given model unless validation falls more than "
                             "hard_negatives.keep_within below it")
    batch_size: int = Field(8, ge=1)
    epoch_windows: int = Field(128, ge=0, description="an epoch draws at least this many windows inside the "
                                                      "training blocks (positives and others in the proportion of "
                                                      "the chips cut), however few chips a small area gives: "
                                                      "without it a district with a dozen chips trains a few "
                                                      "dozen steps in all; 0: as many as the chips")
    positive_windows: Literal["pixels", "outlines"] = Field(
        "pixels", description="how the windows that hold a label are drawn: each labelled pixel alike (pixels: a "
                              "mine is seen in proportion to its area) or each outline in proportion to the "
                              "square root of its area (outlines: thin dredging sites and small pits are seen "
                              "more often)")
    other_years_share: float | None = Field(
        0.5, ge=0, lt=1, description="share of the windows drawn from the blocks of other years (chips.other_years): "
                                     "of those holding a label and of those placed anywhere (the windows around the "
                                     "background chips' places stay in the labels' year, whose labels are exact); "
                                     "null: every year's blocks alike")
    validation_years: Literal["labels", "shown"] = Field(
        "labels", description="the validation that chooses the epoch, fits the calibration and the card's "
                              "threshold: labels, the labels' year's validation blocks (whose labels are exact); "
                              "shown, those and the same blocks in every year of chips.other_years, pooled (the "
                              "model maps every year). Measured on a fresh draw, shown stopped slow learners too "
                              "early (README, Accuracy on any scene)")
    crop_size: int | None = Field(None, ge=32, description="training sees a random square of this side from each "
                                                           "chip (a multiple of 32); default: the chip less 64 px "
                                                           "for chips of 256 px or more (60 % of the compute of "
                                                           "a whole 256 px chip), the whole chip otherwise")
    ema_decay: float = Field(0.95, ge=0, lt=1, description="validation and the saved model use an exponential "
                                                          "moving average of the weights, with this decay per "
                                                          "step (steadier than the last step's weights; 0: off)")
    learning_rate: float = Field(6e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="arithmetic of the network's forward passes: bf16 or fp16 (autocast; weights and "
                            "optimiser stay float32, fp16 scales the loss) or fp32; auto is bf16 where the device "
                            "computes it natively (a CPU with AMX or AVX512-BF16, a recent GPU), fp16 on an "
                            "older GPU, fp32 elsewhere")
    checkpoint_steps: int = Field(200, ge=1, description="the training state (weights, optimiser, the epoch's "
                                                         "place) is saved every this many steps as well as after "
                                                         "each epoch: a killed run resumes mid-epoch")
    loader_workers: int | None = Field(None, ge=0, description="processes reading and augmenting chips ahead of "
                                                               "the optimiser; default: 0 on a CPU (the model "
                                                               "uses every core), up to 8 beside a GPU")
    channels_last: bool | None = Field(None, description="NHWC memory layout for the network (faster on GPUs "
                                                         "with tensor cores); default: on CUDA")
    compile: bool = Field(False, description="torch.compile the network for training (minutes of compiling "
                                             "first; pays off on long GPU runs)")


class PredictConfig(Section):
    tile_size: int = Field(4096, ge=64, description="tile side in pixels; the unit of work with a year (windows "
                                                      "that straddle a tile's edge run in both tiles: larger tiles "
                                                      "waste less, smaller ones need less memory)")
    window_size: int | None = Field(None, ge=32, description="side of the inference windows in pixels; default "
                                                             "384 (or the training chip, if larger)")
    window_overlap: float | None = Field(None, ge=0, lt=1, description="share of a window that its neighbours "
                                                                     "overlap, blended with linear ramps; default "
                                                                     "32 px")
    tta: bool = Field(False, description="average the four flips of every window (test-time augmentation; four "
                                         "times the work)")
    mask_clouds: bool = Field(True, description="opaque clouds (brighter in every band than anything in the "
                                                "training chips) are nodata: no observation, not 'no mine'; so, "
                                                "for sources that do not mask clouds themselves, are thin clouds "
                                                "and cloud shadows found in each year's own pixels (white, above "
                                                "the clear-sky line, casting a shadow; dimmed alike beside a "
                                                "cloud), never by comparison with another year, so land that "
                                                "changed (a new mine) stays observed")
    normalise_years: Literal["off", "global", "local"] = Field(
        "off", description="bring each year's reflectance to the training year's over pixels that stay the same: "
                           "one gain and offset per band (global) or fields of them (local); off (the default) "
                           "leaves each year as it is, the model having learnt haze, gains and shadows from its "
                           "augmentation (on fresh draws both fits lowered hazy years: patchy haze widens a "
                           "year's spread, so its gains come out too low)")
    resample: bool = Field(False, description="imagery at another pixel size than the model's is refused; "
                                              "true reads it at the model's pixel size (bilinear), recorded in "
                                              "probabilities/imagery.json")
    batch_size: int = Field(16, ge=1, description="windows per forward pass, counted in training chips (a "
                                                  "512 px window of a model trained on 256 px chips counts 4)")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="arithmetic of inference: bf16 or fp16 (autocast) or fp32; auto is bf16 where the "
                            "device computes it natively, fp16 on an older GPU, fp32 elsewhere (probabilities "
                            "differ by less than 0.01)")


class VectorizeConfig(Section):
    threshold: float | None = Field(None, gt=0, lt=1, description="default: the model card's threshold")
    min_area_m2: float = Field(1000.0, ge=0)
    simplify_m: float = Field(0.0, ge=0)
    max_rectangularity: float = Field(0.9, gt=0, le=1, description=(
        "an outline of 64 pixels or more that fills more than this share of its smallest enclosing rectangle is "
        "a field, clearing or plantation block, not a mine, and is dropped; raised to the labels' 99th "
        "percentile where more of them are rectangles (quarries drawn as boxes). Hard-negative mining uses the "
        "same rule (hard_negatives.max_rectangularity). 1: shape never decides"))
    fill_unobserved: bool = Field(True, description="pixels a year did not observe (cloud, shadow, no imagery) "
                                                    "count as mining where the previous processed year shows "
                                                    "mining and the next one, if observed there, does too (the "
                                                    "first year is never filled); outlines carry the share so "
                                                    "filled (filled_share). false: unobserved pixels are no mine")


class PostprocessConfig(Section):
    temporal: Literal["provisional", "study", "off"] = Field(
        "provisional", description="study: a polygon stays only if one of an adjacent processed year overlaps it "
                                   "(the first and last year lose every mine without a neighbour); provisional: "
                                   "the same, but such a polygon of the first or last year stays, marked "
                                   "provisional, where the model is confident; off: every polygon")
    provisional_min_probability: float = Field(0.5, ge=0, le=1, description="an edge year's polygon without a "
                                                                           "neighbour stays provisional when its "
                                                                           "mean probability is at least this")
    buffer_m: float = Field(0.0, ge=0)
    countries: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _temporal_filter(cls, data: Any) -> Any:
        """``temporal_filter = false`` (older configs) means ``temporal = "off"``; true, the default rule."""
        if isinstance(data, dict) and "temporal_filter" in data:
            data = dict(data)
            on = data.pop("temporal_filter")
            if not on:
                data.setdefault("temporal", "off")
        return data


class PanelConfig(Section):
    """Mine identities across years: a polygon continues the mine it overlaps most in the previous year."""

    max_gap: int = Field(1, ge=0, description="years a mine may go unseen and keep its identity when it returns "
                                              "(a polygon with no overlap in the previous year looks this many "
                                              "years further back)")
    buffer_m: float = Field(0.0, ge=0, description="polygons of different years within this distance count as "
                                                   "overlapping (0: their interiors must meet)")


class ExportConfig(Section):
    """What ``run`` writes beside panel.parquet (``minemap export`` writes any of them later)."""

    formats: list[Literal["gpkg", "fgb", "csv", "study", "card"]] = Field(
        ["gpkg", "csv", "card"], description="gpkg (a layer a year), fgb (FlatGeobuf), csv (no geometry), study "
                                             "(the published study's per-year GeoPackages), card (DATASET.md)")
    licence: str = Field("CC-BY-4.0", description="the licence the dataset card gives the polygons and tables")
    report: bool = Field(True, description="write report.html, plots and an interactive map that open offline, as "
                                           "the run's last step (`minemap report` writes it later)")


class ReviewConfig(Section):
    """Verdicts of `minemap review import` back into training (see minemap.review.training_verdicts)."""

    use_verdicts: bool = Field(True, description="train with the verdicts of the training year: confirmed detections "
                                                 "become labels, rejected labels are dropped, rejected detections "
                                                 "get training chips taught as background, unsure outlines are "
                                                 "ignored")
    verdicts: Path | None = Field(None, description="the verdicts file (default: OUT/review/verdicts.parquet, where "
                                                    "`minemap review import --run OUT` keeps them)")


# one entry per kind of source; ``source`` tells which (a bare path is the local source)
ImageryConfig = Annotated[LocalImageryConfig | StacImageryConfig | PlanetImageryConfig, Field(discriminator="source")]


class RunConfig(Section):
    labels: list[Path] = Field([], description="training polygons; not needed with model.path")
    imagery: ImageryConfig
    train_year: int | None = Field(None, description="year of the imagery the labels were drawn on; not needed "
                                                     "with model.path")
    years: list[int]
    out: Path
    bands: list[str] | None = None
    aoi: str | list[float] | None = Field(None, description="where to map (default: all the imagery): a bbox "
                                                            "'west,south,east,north', ISO3 codes 'GHA,CIV', "
                                                            "'tropics', 'labels:<metres>' or a vector file; see "
                                                            "minemap.aoi")
    reference: Path | None = None
    workers: int = Field(1, ge=1, description="local processes that predict (tile, year) units")
    scheduler: str | None = Field(None, description="address of an existing Dask cluster's scheduler, e.g. "
                                                    "tcp://host:8786: prediction units run on its workers")
    accept_weak_model: bool = False
    chips: ChipConfig = ChipConfig()
    hard_negatives: HardNegativeConfig = HardNegativeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    vectorize: VectorizeConfig = VectorizeConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    panel: PanelConfig = PanelConfig()
    export: ExportConfig = ExportConfig()
    review: ReviewConfig = ReviewConfig()

    @field_validator("labels", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v

    @field_validator("years", mode="before")
    @classmethod
    def _years(cls, v: Any) -> Any:
        return parse_years(v) if isinstance(v, (str, int)) else v

    @field_validator("imagery", mode="before")
    @classmethod
    def _bare_path(cls, v: Any) -> Any:
        return {"source": "local", "path": v} if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _labels_or_model(self) -> RunConfig:
        if self.model.path is None:
            if not self.labels:
                raise ValueError("labels are needed to train a model (or give model.path to map with a trained one)")
            if self.train_year is None:
                raise ValueError("train_year is needed with labels: the year of the imagery they were drawn on")
        return self


def parse_years(spec: str | int) -> list[int]:
    """``"2019-2021"`` -> [2019, 2020, 2021]; ``"2016,2019"`` -> [2016, 2019]; ``2020`` -> [2020]."""
    years: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d{4})(?:-(\d{4}))?", part)
        if not m:
            raise InputError(f"years {spec!r}: expected e.g. 2019-2021 or 2016,2019")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise InputError(f"years {spec!r}: range {a}-{b} runs backwards")
        years.update(range(a, b + 1))
    return sorted(years)


def _flatten_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The settings models a field's type may hold (a section, or a union of them such as the imagery sources)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _sections(a)]


def _resolve_paths(model: type[BaseModel], data: dict, base: Path) -> None:
    """Every relative path of ``data`` (a TOML table read for ``model``) resolved against ``base``, in place: a
    key whose field holds paths, given as text or a list of texts, and the same in every table below (a bare
    ``imagery`` path too: it stands for a local source's path)."""
    def resolve(v: str) -> str:
        return str(base / Path(v).expanduser())

    for name, field in model.model_fields.items():
        value = data.get(name)
        if isinstance(value, dict):
            sections = _sections(field.annotation)
            if len(sections) > 1:  # a union of tables (the imagery sources): the one its ``source`` names
                sections = [m for m in sections if "source" in m.model_fields
                            and m.model_fields["source"].default == value.get("source")][:1]
            for section in sections:
                _resolve_paths(section, value, base)
        elif holds_paths(field.annotation) or (name == "imagery" and model is RunConfig):
            if isinstance(value, str) and value:  # an empty text is no path (none, for an optional one)
                data[name] = resolve(value)
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                data[name] = [resolve(v) for v in value]


def load_config(path: Path | None = None, **overrides: Any) -> RunConfig:
    """Read a TOML config (optional), apply overrides (``None`` values ignored), validate.

    Overrides use dotted keys for stage tables, e.g. ``{"train.epochs": 3}``. One rule for paths in the file:
    every relative path (``~`` expanded) is resolved against the file's folder, whatever its key or table
    (:func:`_resolve_paths`), so a config means the same from any working directory; ``aoi`` and ``scheduler``,
    which name a file or something else, are resolved so where that file lies beside the config. Paths given as
    overrides (flags) stay relative to the working directory, as a shell user expects.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a valid TOML file ({e})") from None
        base = path.parent
        _resolve_paths(RunConfig, data, base)
        for key in ("aoi", "scheduler"):  # a value that may name a file: resolved where the file is beside the config
            if isinstance(data.get(key), str) and (base / data[key]).is_file():
                data[key] = str(base / data[key])
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        src = f"{path}: " if path is not None else ""
        raise InputError(f"{src}invalid configuration: {_flatten_error(e)}") from None
