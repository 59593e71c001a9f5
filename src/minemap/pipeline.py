"""The whole pipeline in a row, resumable, inside one run folder (its layout: :mod:`minemap.formats.run`).

The stages are declared once, in :data:`STAGES`: each names the command that runs it alone, the table of the
settings it reads, the stages its key is made from, its outputs, and the rest of what its key depends on.
:func:`run` goes down that list: labels -> chips -> train -> hard_negatives -> finetune -> predict -> vectorize
-> postprocess -> panel -> evaluate -> export -> report (``minemap stages`` prints it).

Training is a first fit, then (``hard_negatives.enabled``) hard-negative mining and a fine-tune on all chips.
A model whose validation F1 is below ``train.min_val_f1`` stops the run unless ``accept_weak_model`` (a
validation too small to judge alone is pooled with the test blocks: :func:`minemap.train.weak_model_error`). With
``model.path`` (``--model DIR``) the run maps with that trained model instead: no labels, chips or training
(OUT/model/ is not written; the model is used where it lies). Between predict and vectorize the threshold is
chosen on the training year's validation blocks (``threshold.json``).

A stage is skipped when the manifest holds it with the same key (its inputs and settings, chained through the
stages before it) and its outputs exist; an interrupted training resumes from its last epoch; prediction
resumes per (tile, year). ``overwrite=True`` redoes everything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import pyarrow.parquet as pq
import shapely

from minemap._io import file_sha256, stable_hash, write_json
from minemap.aoi import parse_aoi
from minemap.chips import hard_negative_chips, make_chips, shown_years
from minemap.config import RunConfig, VectorizeConfig
from minemap.errors import ImageryError, InputError, ModelError
from minemap.evaluate import EVALUATE_FORMAT, evaluate_stage
from minemap.execution import connect
from minemap.export import EXPORT_FILES, export
from minemap.formats.chips import CHIPS_FORMAT, possible_missed_mines, split_blocks
from minemap.formats.panel import PANEL_FORMAT
from minemap.formats.run import CARD, STATE, WEIGHTS, RunFolder
from minemap.formats.vectors import write_geoparquet
from minemap.imagery import describe, open_imagery
from minemap.labels import read_labels
from minemap.manifest import Manifest
from minemap.model import read_card
from minemap.panel import build_panel, write_panel
from minemap.postprocess import postprocess_stage
from minemap.predict import absolute_imagery, absolute_path, predict
from minemap.report import REPORT_FORMAT, report
from minemap.review import TrainingVerdicts, apply_to_labels, training_verdicts
from minemap.synthetic import make_scene
from minemap.threshold import block_threshold
from minemap.train import train, weak_model_error
from minemap.vectorize import field_level, read_polygons, vectorize, vectorize_year

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    model_dir: Path
    panel: Path
    panel_gpkg: Path
    summary: Path
    metrics: Path | None = None
    metrics_data: dict | None = None
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage this run did


def _file_key(path: Path) -> str:
    if not Path(path).exists():
        raise InputError(f"{path}: file not found")
    if Path(path).is_dir():
        return stable_hash(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                  for p in Path(path).rglob("*") if p.is_file()))
    return file_sha256(Path(path))


@dataclass(frozen=True)
class Stage:
    """A stage of :func:`run`, declared once: its name (in the manifest and in messages), the command that runs it
    alone, the table of RunConfig that holds its settings, the stages its key is made from, its outputs (a stage
    is done when the manifest holds its key and they exist) and the rest of its key (the settings and inputs that
    change its outputs), and whether it runs for a configuration."""

    name: str
    command: str
    section: str | None
    after: tuple[str, ...]
    outputs: Callable[[_Run], list[Path]]
    key_parts: Callable[[_Run], list]
    applies: Callable[[_Run], bool] = lambda r: True
    action: Callable[[_Run], None] = lambda r: None
    #: the stages after it see no key (None) where it does not run (an optional input, such as the evaluation);
    #: else its key is computed either way, so that what follows stays chained to what came before
    optional: bool = False


@dataclass
class _Run:
    """What the stages of one run share: its settings, folder, manifest, source, and each stage's key."""

    cfg: RunConfig
    folder: RunFolder
    manifest: Manifest
    source: object
    overwrite: bool
    progress: bool
    trained: bool
    imagery_key: str = ""  # the pixels of every year mapped (and the settings that change them)
    train_imagery_key: str = ""  # the training year's
    verdicts: TrainingVerdicts | None = None
    aoi: shapely.Geometry | None = None
    ref_key: str | None = None
    threshold: float | None = None
    labels: gpd.GeoDataFrame | None = None  # the labels, where the run has them
    fields: float | None = None  # the rectangularity above which an outline is a field (vectorize.field_level)
    model_dir: Path | None = None
    keys: dict[str, str | None] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def first_dir(self) -> Path:
        """The first fit's folder: model_initial/ where a fine-tune follows, else model/."""
        return self.folder.model_initial if self.cfg.hard_negatives.enabled else self.folder.model

    def review_counts(self) -> dict:
        v = self.verdicts
        return v.counts() if v is not None and (v.labels_key() or v.negatives_key()) else {}


def _optional(value) -> list:
    return [value] if value else []


# the stages in order. A stage's key is stable_hash([name, the keys of `after`..., key_parts...]): a change
# upstream, or of the stage's own settings, redoes it and every stage after it
# the settings of hard_negatives that only the fine-tune reads: its key holds them, the hard negatives' does not
FINETUNE_SETTINGS = ("epochs", "patience", "keep_within")

STAGES: tuple[Stage, ...] = (
    Stage("labels", "labels", None, (), lambda r: [r.folder.labels],
          lambda r: [[_file_key(p) for p in r.cfg.labels]] + _optional(r.verdicts.labels_key()),
          applies=lambda r: not r.trained, action=lambda r: _labels(r)),
    Stage("chips", "chips", "chips", ("labels",), lambda r: [r.folder.chips / "index.parquet"],
          lambda r: [r.train_imagery_key, r.cfg.train_year, r.cfg.bands, r.cfg.chips.model_dump(), CHIPS_FORMAT]
          + _optional(r.verdicts.negatives_key()),
          applies=lambda r: not r.trained, action=lambda r: _chips(r)),
    Stage("train", "train", "train", ("chips",), lambda r: [r.first_dir / CARD],
          lambda r: [r.cfg.model.model_dump(), _train_settings(r.cfg), r.first_dir.name],
          applies=lambda r: not r.trained,
          action=lambda r: _train_resumable(r, "train", [r.folder.chips], r.first_dir)),
    Stage("hard_negatives", "train", "hard_negatives", ("train",),
          lambda r: [r.folder.hard_negative_chips / "index.parquet"],
          lambda r: [r.train_imagery_key, r.cfg.hard_negatives.model_dump(exclude=set(FINETUNE_SETTINGS)),
                     _predict_settings(r.cfg, "tile_size", "normalise_years")],
          applies=lambda r: not r.trained and r.cfg.hard_negatives.enabled, action=lambda r: _hard_negatives(r)),
    Stage("finetune", "train", "hard_negatives", ("hard_negatives",), lambda r: [r.folder.model / CARD],
          lambda r: [getattr(r.cfg.hard_negatives, k) for k in FINETUNE_SETTINGS],
          applies=lambda r: not r.trained and r.cfg.hard_negatives.enabled,
          action=lambda r: _train_resumable(r, "finetune", [r.folder.chips, r.folder.hard_negative_chips],
                                            r.folder.model, init_from=r.first_dir,
                                            epochs=r.cfg.hard_negatives.epochs,
                                            patience=r.cfg.hard_negatives.patience,
                                            keep_within=r.cfg.hard_negatives.keep_within)),
    Stage("predict", "predict", "predict", ("model",), lambda r: [r.folder.probabilities / str(y) for y in r.cfg.years],
          lambda r: [r.imagery_key, _predict_settings(r.cfg), r.cfg.years, r.cfg.bands,
                     None if r.aoi is None else shapely.to_wkb(r.aoi, hex=True)],
          action=lambda r: predict(r.model_dir, r.cfg.imagery, r.cfg.years, r.folder.probabilities, r.cfg.predict,
                                   r.cfg.bands, r.cfg.workers, overwrite=r.overwrite, progress=r.progress,
                                   aoi=r.aoi, scheduler=r.cfg.scheduler)),
    Stage("vectorize", "vectorize", "vectorize", ("predict",), lambda r: list(_polygon_paths(r).values()),
          lambda r: [r.threshold, r.cfg.vectorize.model_dump(), r.fields],
          action=lambda r: vectorize(r.folder.probabilities, r.cfg.years, r.folder.polygons, r.threshold,
                                     r.cfg.vectorize, r.cfg.workers, r.cfg.scheduler, r.progress, r.fields)),
    Stage("postprocess", "postprocess", "postprocess", ("vectorize",), lambda r: [r.folder.postprocessed],
          lambda r: [r.cfg.postprocess.model_dump(),
                     _file_key(r.cfg.postprocess.countries) if r.cfg.postprocess.countries else None],
          action=lambda r: postprocess_stage(read_polygons(_polygon_paths(r)), r.folder.postprocessed,
                                             r.cfg.postprocess)),
    Stage("panel", "panel", "panel", ("postprocess",), lambda r: list(r.folder.panel_files.values()),
          lambda r: [r.cfg.panel.model_dump(), PANEL_FORMAT], action=lambda r: _panel(r)),
    Stage("evaluate", "evaluate", None, ("panel",), lambda r: [r.folder.metrics],
          lambda r: [r.ref_key, r.threshold, EVALUATE_FORMAT],
          applies=lambda r: bool(r.cfg.reference), action=lambda r: _evaluate(r), optional=True),
    # exports last: the dataset card cites the accuracy
    Stage("export", "export", "export", ("panel", "evaluate"),
          lambda r: [r.folder.root / EXPORT_FILES[f] for f in r.cfg.export.formats],
          lambda r: [r.cfg.export.model_dump(exclude={"report"})],
          applies=lambda r: bool(r.cfg.export.formats),
          action=lambda r: export(r.folder.panel, r.folder.root, r.cfg.export.formats, run_dir=r.folder.root,
                                  licence=r.cfg.export.licence)),
    Stage("report", "report", "export", ("export",), lambda r: [r.folder.report],
          lambda r: [r.ref_key, REPORT_FORMAT], applies=lambda r: r.cfg.export.report and _has_mines(r),
          action=lambda r: report(r.folder.root, r.folder.report, r.cfg.reference, progress=r.progress)),
)
STAGE = {s.name: s for s in STAGES}


def stage_key(stage: Stage, r: _Run) -> str:
    return stable_hash([stage.name, *(r.keys.get(a) for a in stage.after), *stage.key_parts(r)])


def _step(r: _Run, stage: Stage) -> None:
    """The stage's key, then the stage itself unless the manifest holds that key and its outputs exist."""
    applies = stage.applies(r)
    key = r.keys[stage.name] = stage_key(stage, r) if applies or not stage.optional else None
    if not applies:
        return
    if r.manifest.done(f"stage:{stage.name}", key) and all(p.exists() for p in stage.outputs(r)):
        r.skipped.append(stage.name)
        log.info("%s: up to date, skipped", stage.name)
        return
    t0 = time.perf_counter()
    stage.action(r)
    r.manifest.mark(f"stage:{stage.name}", key)
    r.seconds[stage.name] = round(time.perf_counter() - t0, 2)
    log.info("%s: done in %.1f s", stage.name, r.seconds[stage.name])


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Run every stage of ``cfg`` into ``cfg.out`` (:data:`STAGES`, in order); see the module docstring for the
    layout and resuming."""
    cfg = _absolute(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output path exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out)
    manifest = Manifest(folder.manifest)
    if overwrite:
        manifest.forget()

    # check every input before any long work starts
    trained = cfg.model.path is not None  # map with a model trained before: no labels, chips or training
    if trained:
        card = read_card(cfg.model.path)
        if not (Path(cfg.model.path) / WEIGHTS).is_file():
            raise ModelError(f"{Path(cfg.model.path) / WEIGHTS}: weights missing")
        if cfg.labels:
            log.warning("model.path is given: the labels are not used (no training)")
    source = open_imagery(cfg.imagery, cfg.bands)
    have = source.years()
    shown = [] if trained else _shown_years(cfg)
    needed = sorted({*cfg.years} | ({cfg.train_year, *shown} if not trained else set()))
    missing = [y for y in needed if y not in have]
    if missing:
        raise ImageryError(f"{describe(cfg.imagery)}: no imagery for year(s) {', '.join(map(str, missing))} "
                           f"(years found: {', '.join(map(str, have)) or 'none'})")
    for y in needed:
        source.check_bands(y)
    around_labels = isinstance(cfg.aoi, str) and cfg.aoi.strip().startswith("labels:")
    if around_labels and not cfg.labels:
        raise InputError(f"aoi {cfg.aoi!r}: needs labels (give labels, or another kind of AOI)")
    r = _Run(cfg, folder, manifest, source, overwrite, progress, trained)
    r.aoi = parse_aoi(cfg.aoi, countries=cfg.postprocess.countries) if cfg.aoi is not None and not around_labels \
        else None
    if cfg.scheduler:  # an unreachable cluster is an error before any long work, not after training
        connect(cfg.scheduler).close()
    r.ref_key = _file_key(cfg.reference) if cfg.reference else None
    # what the pixels depend on: new imagery redoes chips and prediction
    image_keys = {y: source.fingerprint(y) for y in have if y in needed or (trained and y == card.train_year)}
    r.imagery_key = stable_hash([_imagery_settings(cfg), image_keys])

    if trained:
        r.model_dir = Path(cfg.model.path)
        r.keys["model"] = stable_hash(["model", file_sha256(r.model_dir / WEIGHTS), file_sha256(r.model_dir / CARD)])
        card = _check_floor(cfg, r.model_dir)
    else:
        # the training year's pixels: new imagery of that year redoes chips and training
        r.train_imagery_key = stable_hash([_imagery_settings(cfg), source.fingerprint(cfg.train_year)]
                                          + _optional({y: source.fingerprint(y) for y in shown}))
        r.verdicts = _verdicts(cfg)
        for name in ("labels", "chips", "train"):
            _step(r, STAGE[name])
        _check_floor(cfg, r.first_dir)  # a model that learnt nothing would mine the whole scene as hard negatives
        for name in ("hard_negatives", "finetune"):
            _step(r, STAGE[name])
        r.model_dir = folder.model
        r.keys["model"] = r.keys["finetune" if cfg.hard_negatives.enabled else "train"]
        card = _check_floor(cfg, r.model_dir)
    # the labels, cleaned by the labels stage (or read now, with a trained model): the AOI around them, and the
    # shapes of mines that outlines shaped like fields are judged against
    if not trained:
        r.labels = gpd.read_parquet(folder.labels)
    elif cfg.labels:
        r.labels = read_labels(cfg.labels)[0]
    if around_labels:
        r.aoi = parse_aoi(cfg.aoi, labels=r.labels)
    r.fields = field_level(cfg.vectorize, r.labels)

    _step(r, STAGE["predict"])
    r.threshold = cfg.vectorize.threshold or card.threshold
    if not trained and cfg.vectorize.threshold is None and cfg.train_year in cfg.years:
        r.threshold = _block_threshold(cfg, source, folder.probabilities, out, card.threshold)
    for name in ("vectorize", "postprocess", "panel", "evaluate", "export"):
        _step(r, STAGE[name])
    if cfg.export.report and not _has_mines(r):
        log.warning("no mines in any year: %s not written", folder.report)
    _step(r, STAGE["report"])
    result = RunResult(out, r.model_dir, folder.panel, folder.root / EXPORT_FILES["gpkg"],
                       folder.panel_files["summary"], skipped=r.skipped, seconds=r.seconds)
    if cfg.reference:
        result.metrics = folder.metrics
        result.metrics_data = json.loads(folder.metrics.read_text())
    return result


def _polygon_paths(r: _Run) -> dict[int, Path]:
    return {y: r.folder.polygons / f"{y}.parquet" for y in r.cfg.years}


def _has_mines(r: _Run) -> bool:
    return pq.ParquetFile(r.folder.panel).metadata.num_rows > 0


def _labels(r: _Run) -> None:
    labels, _ = read_labels(r.cfg.labels)
    write_geoparquet(apply_to_labels(labels, r.verdicts), r.folder.labels)


def _shown_years(cfg: RunConfig) -> list[int]:
    """The years besides the labels' whose imagery training sees (``chips.other_years``): a number N counts the
    years the run maps, never one it was not asked for (a remote source offers every year; fetching years nobody
    asked for would be slow, and may find nothing)."""
    return shown_years(cfg.chips, cfg.train_year, sorted(cfg.years))


def _chips(r: _Run) -> None:
    make_chips(gpd.read_parquet(r.folder.labels), r.source, r.cfg.train_year, r.folder.chips, r.cfg.chips,
               labels_path=r.cfg.labels[0] if len(r.cfg.labels) == 1 else None, reviewed=r.verdicts,
               other_years=_shown_years(r.cfg))


def _panel(r: _Run) -> None:
    built = build_panel(gpd.read_parquet(r.folder.postprocessed), r.cfg.panel, where=str(r.folder.postprocessed))
    write_panel(built.panel, built.events, r.folder.root, built.changes)


def _evaluate(r: _Run) -> None:
    # a run that trained its own model is scored on its test blocks; a model trained elsewhere everywhere
    splits = None if r.trained else split_blocks(r.folder.chips)
    evaluate_stage(gpd.read_parquet(r.folder.panel), r.cfg.reference, r.folder.probabilities, r.folder.metrics,
                   r.threshold, splits=splits, source=r.source)


def _block_threshold(cfg: RunConfig, source, prob_dir: Path, out: Path, card_threshold: float) -> float:
    """The operating threshold on the validation blocks of the training year, mapped wall to wall (half the
    best F1: see minemap.threshold), recorded in ``threshold.json``; the card's (validation chips') where they hold too few
    labelled pixels."""
    folder = RunFolder(out)
    chips_dirs = [folder.chips] + ([folder.hard_negative_chips] if cfg.hard_negatives.enabled else [])
    found = block_threshold(sorted((prob_dir / str(cfg.train_year)).glob("*.tif")), source.grid(cfg.train_year),
                            folder.chips, gpd.read_parquet(folder.labels),
                            possible_missed_mines([d for d in chips_dirs if d.is_dir()]))
    record = {"threshold": found["threshold"] if found else card_threshold, "validation_chips": card_threshold,
              "validation_blocks": found,
              "rule": "half the best F1 over the validation blocks of the training year, mapped wall to wall "
                      "(the F1-optimal threshold of calibrated probabilities; outline band and possible missed "
                      "mines left out); the validation chips' where the blocks hold too few labelled pixels"}
    write_json(folder.threshold, record)
    return record["threshold"]


def _absolute(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the paths that travel to workers absolute: the run directory (tiles to write and to
    vectorise), the imagery and the model. Workers of a cluster run in folders of their own, often on other
    machines; a relative path there names another place (tiles written where this process never looks) or none.
    Stage keys do not hold these paths, so a run started with relative ones resumes as it was."""
    update = {"out": absolute_path(cfg.out), "imagery": absolute_imagery(cfg.imagery)}
    if cfg.model.path is not None:
        update["model"] = cfg.model.model_copy(update={"path": absolute_path(cfg.model.path)})
    return cfg.model_copy(update=update)


def _imagery_settings(cfg: RunConfig) -> dict:
    """The source's settings that change pixels (not where it lives, its cache, time-outs or retries); the
    source's fingerprints carry the rest."""
    return cfg.imagery.model_dump(mode="json", exclude={"path", "cache_dir", "timeout_s", "retries"})


def _train_settings(cfg: RunConfig) -> dict:
    # the validation floor judges a model, it does not change it; nor do the device, how often the state is saved
    # and how many processes read ahead (tests/test_train.py shows the last two)
    return cfg.train.model_dump(exclude={"min_val_f1", "device", "checkpoint_steps", "loader_workers"})


def _predict_settings(cfg: RunConfig, *also: str) -> dict:
    """The prediction settings that change probabilities (not the device or batch size), less ``also``."""
    return cfg.predict.model_dump(exclude={"device", "batch_size", *also})


def _check_floor(cfg: RunConfig, model_dir: Path):
    card = read_card(model_dir)
    weak = weak_model_error(card, cfg.train.min_val_f1, model_dir, cfg.train.min_val_pixels)
    if weak is not None:
        if not cfg.accept_weak_model:
            raise weak
        log.warning("%s (accepted)", weak)
    return card


def _train_resumable(r: _Run, name: str, chips_dirs: list[Path], model_dir: Path, **kwargs) -> None:
    """Train, resuming only a training started with these very settings (the stage's key)."""
    key = r.keys[name]
    resume = r.manifest.done(f"started:{name}", key) and (model_dir / STATE).is_file()
    r.manifest.mark(f"started:{name}", key)
    train(chips_dirs, model_dir, r.cfg.train, r.cfg.model, resume=resume, progress=r.progress, run_key=key,
          review=r.review_counts(), **kwargs)


def _verdicts(cfg: RunConfig) -> TrainingVerdicts:
    """The reviewers' verdicts this run's training uses (none unless ``review.use_verdicts``), logged."""
    if not cfg.review.use_verdicts:
        return TrainingVerdicts.none()
    if cfg.review.verdicts is not None and not Path(cfg.review.verdicts).is_file():
        raise InputError(f"{cfg.review.verdicts}: review.verdicts: file not found")
    got = training_verdicts(cfg.review.verdicts or RunFolder(cfg.out).verdicts, cfg.train_year)
    if got.labels_key() or got.negatives_key() or got.other_years:
        log.info("review verdicts of %d used in training: %s", cfg.train_year, got.counts())
    return got


def _hard_negatives(r: _Run) -> None:
    """Map the training year with the first model and cut chips where it fires away from the labels (never
    sparing a detection a reviewer rejected as a possible missed mine)."""
    cfg, year = r.cfg, r.cfg.train_year
    prob_dir = r.folder.hard_negative_probabilities
    predict(r.first_dir, cfg.imagery, [year], prob_dir, cfg.predict, cfg.bands, cfg.workers, overwrite=r.overwrite,
            progress=r.progress, scheduler=cfg.scheduler)
    level = min(cfg.hard_negatives.search_level, read_card(r.first_dir).threshold)
    tiles = sorted((prob_dir / str(year)).glob("*.tif"))
    # every detection of the first model, whatever its shape: the hard-negative rule judges rectangles itself
    detections = vectorize_year(tiles, year, level, VectorizeConfig(min_area_m2=0.0, max_rectangularity=1))
    hard_negative_chips(detections, gpd.read_parquet(r.folder.labels), r.source, r.folder.chips,
                        r.folder.hard_negative_chips, cfg.chips, cfg.hard_negatives, level, tiles, r.verdicts)


DEMO_YEARS = (2019, 2020, 2021)


def demo_config(out: Path, epochs: int | None = None) -> RunConfig:
    """The settings of ``minemap demo``: the defaults (a mit-b0), with the scene's paths, and two changes.

    ``chips.chip_size`` is 128: the demo scene is 1024 px wide, and 256 px chips in split blocks would leave it
    one chip per block. ``postprocess.buffer_m`` is 10: the demo's mines are drawn anew each year, so a few
    metres of tolerance let the temporal rule match a mine's outlines across years."""
    scene = Path(out) / "scene"
    data = {
        "labels": [scene / f"labels_{DEMO_YEARS[0]}.gpkg"], "imagery": scene / "imagery",
        "train_year": DEMO_YEARS[0], "years": list(DEMO_YEARS), "out": Path(out) / "run",
        "reference": scene / "truth.gpkg",
        "chips": {"chip_size": 128},
        "postprocess": {"buffer_m": 10},
    }
    if epochs is not None:
        data["train"] = {"epochs": epochs}
    return RunConfig.model_validate(data)


def run_demo(out: Path, epochs: int | None = None, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Write the synthetic demo scene under ``out/scene`` (once) and run the pipeline into ``out/run``."""
    scene = Path(out) / "scene"
    if overwrite or not (scene / "truth.gpkg").is_file():
        make_scene(scene, years=DEMO_YEARS, train_year=DEMO_YEARS[0])
    return run(demo_config(out, epochs), overwrite=overwrite, progress=progress)
