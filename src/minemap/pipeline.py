"""The whole pipeline in a row, resumable: labels -> chips -> train -> predict -> vectorize -> postprocess ->
panel -> evaluate, inside one run directory.

Run directory::

    OUT/labels.parquet            cleaned labels
    OUT/chips/                    training chips (images/, masks/, index.parquet, meta.json)
    OUT/model_initial/            the first fit (with hard negatives on)
    OUT/hard_negatives/           the training year mapped by the first fit, and chips where it fired away
                                  from the labels (probabilities/, chips/)
    OUT/model/                    weights.safetensors, model.json (+ train_state.pt): the model used
    OUT/probabilities/<year>/     probability COGs per tile (+ manifest.jsonl of finished tiles)
    OUT/threshold.json            the threshold vectorised with: best F1 on the training year's validation blocks
    OUT/polygons/<year>.parquet   vectorised polygons
    OUT/postprocessed.parquet     temporal filter, countries, areas
    OUT/panel.parquet, panel.gpkg, summary.csv, mines.*, events.*, changes.*  (see minemap.panel)
    OUT/metrics.json              with a reference
    OUT/manifest.jsonl            finished stages and the fingerprint of what they were made from

Training is a first fit, then (``hard_negatives.enabled``) hard-negative mining and a fine-tune on all chips.
A model whose validation F1 is below ``train.min_val_f1`` stops the run unless ``accept_weak_model``. With
``model.path`` (``--model DIR``) the run maps with that trained model instead: no labels, chips or training
(OUT/model/ is not written; the model is used where it lies).

A stage is skipped when the manifest holds it with the same fingerprint (its inputs and settings, chained
through the stages before it) and its outputs exist; an interrupted training resumes from its last epoch;
prediction resumes per (tile, year). ``overwrite=True`` redoes everything.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import pyarrow.parquet as pq
import shapely

from minemap._io import file_sha256, stable_hash, write_json
from minemap.aoi import parse_aoi
from minemap.chips import hard_negative_chips, make_chips
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
from minemap.vectorize import read_polygons, vectorize, vectorize_year

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


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Run every stage of ``cfg`` into ``cfg.out``; see the module docstring for the layout and resuming."""
    cfg = _absolute(cfg)
    out = Path(cfg.out)
    folder = RunFolder(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output path exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder.manifest)
    if overwrite:
        manifest.forget()
    skipped: list[str] = []
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}

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
    needed = sorted({*cfg.years} | ({cfg.train_year} if not trained else set()))
    missing = [y for y in needed if y not in have]
    if missing:
        raise ImageryError(f"{describe(cfg.imagery)}: no imagery for year(s) {', '.join(map(str, missing))} "
                           f"(years found: {', '.join(map(str, have)) or 'none'})")
    for y in needed:
        source.check_bands(y)
    around_labels = isinstance(cfg.aoi, str) and cfg.aoi.strip().startswith("labels:")
    if around_labels and not cfg.labels:
        raise InputError(f"aoi {cfg.aoi!r}: needs labels (give labels, or another kind of AOI)")
    aoi = parse_aoi(cfg.aoi, countries=cfg.postprocess.countries) if cfg.aoi is not None and not around_labels \
        else None
    if cfg.scheduler:  # an unreachable cluster is an error before any long work, not after training
        connect(cfg.scheduler).close()
    ref_key = _file_key(cfg.reference) if cfg.reference else None
    # what the pixels depend on: new imagery redoes chips and prediction
    image_keys = {y: source.fingerprint(y) for y in have if y in needed or (trained and y == card.train_year)}
    imagery_key = stable_hash([_imagery_settings(cfg), image_keys])

    def stage(name: str, key: str, outputs: list[Path]) -> bool:
        """True if the stage must run."""
        if manifest.done(f"stage:{name}", key) and all(p.exists() for p in outputs):
            skipped.append(name)
            log.info("%s: up to date, skipped", name)
            return False
        started[name] = time.perf_counter()
        return True

    def finished(name: str, key: str) -> None:
        manifest.mark(f"stage:{name}", key)
        seconds[name] = round(time.perf_counter() - started[name], 2)
        log.info("%s: done in %.1f s", name, seconds[name])

    if trained:
        model_dir = Path(cfg.model.path)
        k_train = stable_hash(["model", file_sha256(model_dir / WEIGHTS), file_sha256(model_dir / CARD)])
        card = _check_floor(cfg, model_dir)
    else:
        model_dir, k_train, card = _fit(cfg, source, manifest, stage, finished, overwrite, progress)
    if around_labels:  # the labels, cleaned by the labels stage (or read now, with a trained model)
        labels = gpd.read_parquet(folder.labels) if not trained else read_labels(cfg.labels)[0]
        aoi = parse_aoi(cfg.aoi, labels=labels)

    prob_dir = folder.probabilities
    k_predict = stable_hash(["predict", k_train, imagery_key, _predict_settings(cfg), cfg.years, cfg.bands,
                             None if aoi is None else shapely.to_wkb(aoi, hex=True)])
    if stage("predict", k_predict, [prob_dir / str(y) for y in cfg.years]):
        predict(model_dir, cfg.imagery, cfg.years, prob_dir, cfg.predict, cfg.bands, cfg.workers,
                overwrite=overwrite, progress=progress, aoi=aoi, scheduler=cfg.scheduler)
        finished("predict", k_predict)

    threshold = cfg.vectorize.threshold or card.threshold
    if not trained and cfg.vectorize.threshold is None and cfg.train_year in cfg.years:
        threshold = _block_threshold(cfg, source, prob_dir, out, card.threshold)
    poly_dir = folder.polygons
    poly_paths = {y: poly_dir / f"{y}.parquet" for y in cfg.years}
    k_vec = stable_hash(["vectorize", k_predict, threshold, cfg.vectorize.model_dump()])
    if stage("vectorize", k_vec, list(poly_paths.values())):
        vectorize(prob_dir, cfg.years, poly_dir, threshold, cfg.vectorize, cfg.workers, cfg.scheduler, progress)
        finished("vectorize", k_vec)

    pp_path = folder.postprocessed
    countries_key = _file_key(cfg.postprocess.countries) if cfg.postprocess.countries else None
    k_pp = stable_hash(["postprocess", k_vec, cfg.postprocess.model_dump(), countries_key])
    if stage("postprocess", k_pp, [pp_path]):
        postprocess_stage(read_polygons(poly_paths), pp_path, cfg.postprocess)
        finished("postprocess", k_pp)

    panel_paths = folder.panel_files
    k_panel = stable_hash(["panel", k_pp, cfg.panel.model_dump(), PANEL_FORMAT])
    if stage("panel", k_panel, list(panel_paths.values())):
        built = build_panel(gpd.read_parquet(pp_path), cfg.panel, where=str(pp_path))
        write_panel(built.panel, built.events, out, built.changes)
        finished("panel", k_panel)
    export_paths = {k: out / v for k, v in EXPORT_FILES.items()}
    result = RunResult(out, model_dir, panel_paths["parquet"], export_paths["gpkg"], panel_paths["summary"],
                       skipped=skipped, seconds=seconds)
    k_eval = None
    if cfg.reference:
        metrics_path = folder.metrics
        # a run that trained its own model is scored on its test blocks; a model trained elsewhere everywhere
        splits = None if trained else split_blocks(folder.chips)
        k_eval = stable_hash(["evaluate", k_panel, ref_key, threshold, EVALUATE_FORMAT])
        if stage("evaluate", k_eval, [metrics_path]):
            evaluate_stage(gpd.read_parquet(panel_paths["parquet"]), cfg.reference, prob_dir, metrics_path,
                           threshold, splits=splits, source=source)
            finished("evaluate", k_eval)
        result.metrics = metrics_path
        result.metrics_data = json.loads(metrics_path.read_text())
    # exports last: the dataset card cites the accuracy
    k_export = stable_hash(["export", k_panel, k_eval, cfg.export.model_dump(exclude={"report"})])
    if cfg.export.formats and stage("export", k_export, [export_paths[f] for f in cfg.export.formats]):
        export(panel_paths["parquet"], out, cfg.export.formats, run_dir=out, licence=cfg.export.licence)
        finished("export", k_export)
    k_report = stable_hash(["report", k_export, ref_key, REPORT_FORMAT])
    if cfg.export.report and pq.ParquetFile(panel_paths["parquet"]).metadata.num_rows == 0:
        log.warning("no mines in any year: %s not written", folder.report)
    elif cfg.export.report and stage("report", k_report, [folder.report]):
        report(out, folder.report, cfg.reference, progress=progress)
        finished("report", k_report)
    return result


def _fit(cfg: RunConfig, source, manifest: Manifest, stage, finished, overwrite: bool, progress: bool):
    """Stages labels, chips, train, hard_negatives and finetune: the model of a run that trains its own.
    Returns the model directory, the key of its training and its card."""
    folder = RunFolder(cfg.out)
    # the training year's pixels: new imagery of that year redoes chips and training
    imagery_key = stable_hash([_imagery_settings(cfg), source.fingerprint(cfg.train_year)])
    verdicts = _verdicts(cfg)
    # verdicts enter a stage's key only where they change it, so runs without any keep their keys
    labels_key, negatives_key = verdicts.labels_key(), verdicts.negatives_key()
    k_labels = stable_hash(["labels", [_file_key(p) for p in cfg.labels]] + ([labels_key] if labels_key else []))
    labels_path = folder.labels
    if stage("labels", k_labels, [labels_path]):
        labels, _ = read_labels(cfg.labels)
        write_geoparquet(apply_to_labels(labels, verdicts), labels_path)
        finished("labels", k_labels)
    review = verdicts.counts() if labels_key or negatives_key else {}

    chips_dir = folder.chips
    k_chips = stable_hash(["chips", k_labels, imagery_key, cfg.train_year, cfg.bands, cfg.chips.model_dump(),
                           CHIPS_FORMAT]
                          + ([negatives_key] if negatives_key else []))
    if stage("chips", k_chips, [chips_dir / "index.parquet"]):
        make_chips(gpd.read_parquet(labels_path), source, cfg.train_year, chips_dir, cfg.chips,
                   labels_path=cfg.labels[0] if len(cfg.labels) == 1 else None, reviewed=verdicts)
        finished("chips", k_chips)

    model_dir = folder.model
    hn = cfg.hard_negatives
    first_dir = folder.model_initial if hn.enabled else model_dir
    k_train = stable_hash(["train", k_chips, cfg.model.model_dump(), _train_settings(cfg), first_dir.name])
    if stage("train", k_train, [first_dir / CARD]):
        _train_resumable(manifest, "train", k_train, [chips_dir], first_dir, cfg, progress, review=review)
        finished("train", k_train)
    _check_floor(cfg, first_dir)  # a model that learnt nothing would mine the whole scene as hard negatives
    if hn.enabled:
        hn_dir = folder.hard_negatives
        k_hn = stable_hash(["hard_negatives", k_train, imagery_key, hn.model_dump(exclude={"epochs", "patience"}),
                            _predict_settings(cfg, "tile_size", "normalise_years")])
        if stage("hard_negatives", k_hn, [folder.hard_negative_chips / "index.parquet"]):
            _hard_negatives(cfg, source, labels_path, chips_dir, first_dir, hn_dir, overwrite, progress, verdicts)
            finished("hard_negatives", k_hn)
        k_train = stable_hash(["finetune", k_hn, hn.epochs, hn.patience])
        if stage("finetune", k_train, [model_dir / CARD]):
            _train_resumable(manifest, "finetune", k_train, [chips_dir, folder.hard_negative_chips], model_dir, cfg,
                             progress, init_from=first_dir, epochs=hn.epochs, patience=hn.patience, review=review)
            finished("finetune", k_train)
    return model_dir, k_train, _check_floor(cfg, model_dir)


def _block_threshold(cfg: RunConfig, source, prob_dir: Path, out: Path, card_threshold: float) -> float:
    """The threshold of best F1 on the validation blocks of the training year, mapped wall to wall (see
    minemap.threshold), recorded in ``threshold.json``; the card's (validation chips') where they hold too few
    labelled pixels."""
    folder = RunFolder(out)
    chips_dirs = [folder.chips] + ([folder.hard_negative_chips] if cfg.hard_negatives.enabled else [])
    found = block_threshold(sorted((prob_dir / str(cfg.train_year)).glob("*.tif")), source.grid(cfg.train_year),
                            folder.chips, gpd.read_parquet(folder.labels),
                            possible_missed_mines([d for d in chips_dirs if d.is_dir()]))
    record = {"threshold": found["threshold"] if found else card_threshold, "validation_chips": card_threshold,
              "validation_blocks": found,
              "rule": "the threshold of best F1 over the validation blocks of the training year, mapped wall to "
                      "wall (outline band and possible missed mines left out); the validation chips' where the "
                      "blocks hold too few labelled pixels"}
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
    # the validation floor judges a model, it does not change it; the device does not change it either
    return cfg.train.model_dump(exclude={"min_val_f1", "device"})


def _predict_settings(cfg: RunConfig, *also: str) -> dict:
    """The prediction settings that change probabilities (not the device or batch size), less ``also``."""
    return cfg.predict.model_dump(exclude={"device", "batch_size", *also})


def _check_floor(cfg: RunConfig, model_dir: Path):
    card = read_card(model_dir)
    weak = weak_model_error(card, cfg.train.min_val_f1, model_dir)
    if weak is not None:
        if not cfg.accept_weak_model:
            raise weak
        log.warning("%s (accepted)", weak)
    return card


def _train_resumable(manifest: Manifest, name: str, key: str, chips_dirs: list[Path], model_dir: Path,
                     cfg: RunConfig, progress: bool, **kwargs) -> None:
    """Train, resuming only a training started with these very settings."""
    resume = manifest.done(f"started:{name}", key) and (model_dir / STATE).is_file()
    manifest.mark(f"started:{name}", key)
    train(chips_dirs, model_dir, cfg.train, cfg.model, resume=resume, progress=progress, run_key=key, **kwargs)


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


def _hard_negatives(cfg: RunConfig, source, labels_path: Path, chips_dir: Path, first_dir: Path, hn_dir: Path,
                    overwrite: bool, progress: bool, verdicts: TrainingVerdicts | None = None) -> None:
    """Map the training year with the first model and cut chips where it fires away from the labels (never
    sparing a detection a reviewer rejected as a possible missed mine)."""
    year = cfg.train_year
    prob_dir = hn_dir / "probabilities"
    predict(first_dir, cfg.imagery, [year], prob_dir, cfg.predict, cfg.bands, cfg.workers, overwrite=overwrite,
            progress=progress, scheduler=cfg.scheduler)
    level = min(cfg.hard_negatives.search_level, read_card(first_dir).threshold)
    tiles = sorted((prob_dir / str(year)).glob("*.tif"))
    detections = vectorize_year(tiles, year, level, VectorizeConfig(min_area_m2=0.0))
    hard_negative_chips(detections, gpd.read_parquet(labels_path), source, chips_dir, hn_dir / "chips",
                        cfg.chips, cfg.hard_negatives, level, tiles, verdicts)


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
