"""Command-line interface: one sub-command per pipeline stage, plus ``run`` and ``demo``.

Thin by design: parse, call the Python API, print. Every :class:`~minemap.errors.MinemapError` becomes one line
on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minemap.config import (ChipConfig, ExportConfig, ModelConfig, PanelConfig, PostprocessConfig, PredictConfig,
                            TrainConfig, VectorizeConfig)
from minemap.errors import MinemapError
from minemap.execution import scheduler_address

# the commands' defaults are the settings' own (tests/test_cli_defaults.py checks that no option drifts from them)
_CHIPS, _MODEL, _TRAIN, _PREDICT = ChipConfig(), ModelConfig(), TrainConfig(), PredictConfig()
_VECTORIZE, _POSTPROCESS, _PANEL, _EXPORT = VectorizeConfig(), PostprocessConfig(), PanelConfig(), ExportConfig()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Map mining areas in satellite imagery, year after year, as a panel dataset.")
err = Console(stderr=True)
out = Console()


def _stage(fn):
    """Turn minemap errors into one line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MinemapError as e:  # the message is text: "[imagery]" in it is not rich's markup
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; rerun the same command to resume")
            raise typer.Exit(130) from None
    return wrapper


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log each step")] = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("minemap").setLevel(logging.INFO if verbose else logging.WARNING)


def _settings(model, **values):
    """A stage's settings from flags; an invalid value is one line naming the flag, not a traceback."""
    from pydantic import ValidationError

    from minemap.errors import InputError

    try:
        return model(**values)
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "settings"
        raise InputError(f"{flag}: {first['msg']}") from None


def _flag(flag: str, dotted: str, value):
    """``value`` of ``flag``, checked against the field ``dotted`` of :class:`~minemap.config.RunConfig` (e.g.
    ``vectorize.min_area_m2``) before the whole configuration is: an invalid value is one line naming the flag
    (as the stage commands name theirs), not the configuration's path to the field."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from minemap.config import RunConfig
    from minemap.errors import InputError

    *parents, leaf = dotted.split(".")
    model = RunConfig
    for part in parents:
        model = model.model_fields[part].annotation
    field = model.model_fields[leaf]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        TypeAdapter(kind).validate_python(value)
    except ValidationError as e:
        raise InputError(f"{flag}: {e.errors()[0]['msg']}") from None
    return value


def _years(spec: str) -> list[int]:
    from minemap.config import parse_years

    return parse_years(spec)


def _bands(spec: Optional[str]) -> Optional[list[str]]:
    return [b.strip().lower() for b in spec.split(",")] if spec else None


AOI_HELP = ("where to map: west,south,east,north | ISO3 codes (GHA,CIV) | tropics | labels:<metres> | a vector "
            "file")
BandsOpt = Annotated[Optional[str], typer.Option(help="band names in file order, e.g. red,green,blue,nir "
                                                      "(default: the files' band descriptions)")]


@app.command()
@_stage
def labels(paths: Annotated[list[Path], typer.Argument(help="label files (GPKG, GeoJSON, Shapefile, GeoParquet)")],
           out_path: Annotated[Path, typer.Option("--out", help="clean labels, GeoParquet")],
           max_abs_lat: Annotated[Optional[float], typer.Option(help="drop labels beyond this latitude")] = None):
    """Read, repair, merge and deduplicate label polygons into one GeoParquet."""
    from minemap.labels import labels_stage

    report = labels_stage(paths, out_path, max_abs_lat)
    out.print(f"{report.kept} labels -> {out_path}")
    out.print_json(data=report.as_dict())


@app.command()
@_stage
def chips(labels_path: Annotated[Path, typer.Option("--labels", help="label file")],
          imagery: Annotated[Path, typer.Option(help="imagery directory with one folder per year, or a TOML config "
                                                     "whose [imagery] table names a STAC or Planet source")],
          year: Annotated[int, typer.Option(help="year of the imagery the labels were drawn on")],
          out_dir: Annotated[Path, typer.Option("--out", help="chips folder to write")],
          chip_size: int = 256, stride: Optional[int] = None, block_size: Optional[int] = None,
          background_per_positive: float = 0.5, seed: int = 0, bands: BandsOpt = None,
          tile_deg: Annotated[Optional[float], typer.Option(
              help="labels anywhere on Earth: cut them in tiles of this many degrees, each in its own CRS (default "
                   "1 with a remote source, else one area)")] = None,
          workers: Annotated[int, typer.Option(help="local processes cutting tiles")] = 1,
          scheduler: Annotated[Optional[str], typer.Option(
              help="Dask scheduler address that cuts the tiles, e.g. tcp://host:8786")] = None,
          fmt: Annotated[str, typer.Option("--format", help="minemap, or mmseg: also the MMSegmentation layout "
                                                            "(OUT/mmseg/<year>/img_dir|ann_dir/<split>/)")] = "minemap",
          other_years: Annotated[Optional[str], typer.Option(
              help="training also sees the training blocks in these years' imagery, e.g. 2020,2021, or in the "
                   "N years after --year (a number; default 2; 0: none), masked by the same labels")] = None):
    """Cut training chips (images, masks, spatial train/val/test splits) at native resolution."""
    from minemap.chips import make_chips
    from minemap.chips.tiles import make_tiled_chips
    from minemap.errors import InputError
    from minemap.execution import scheduler_address
    from minemap.imagery import open_imagery
    from minemap.labels import read_labels

    if fmt not in ("minemap", "mmseg"):
        raise InputError(f"--format {fmt!r}: choose minemap or mmseg")
    if tile_deg is not None and not 0 < tile_deg <= 90:
        raise InputError(f"--tile-deg {tile_deg}: give degrees between 0 and 90")
    if workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    try:
        shown = [int(y) for y in other_years.split(",")] if other_years is not None else None
    except ValueError:
        shown = []
    if shown is not None and (not shown or len(shown) > 1 and min(shown) < 1000):
        raise InputError(f"--other-years {other_years!r}: give years separated by commas, e.g. 2020,2021, "
                         "or a number of years after --year")
    if shown is not None and len(shown) == 1 and shown[0] < 1000:
        shown = shown[0]
    cfg = _settings(ChipConfig, chip_size=chip_size, stride=stride, block_size=block_size,
                    background_per_positive=background_per_positive, seed=seed,
                    **({} if shown is None else {"other_years": shown}))
    gdf, _ = read_labels([labels_path])
    desc = _imagery_config(imagery, default_bbox=gdf.to_crs("EPSG:4326").total_bounds) if imagery.is_file() else imagery
    if tile_deg is None and not isinstance(desc, Path):
        tile_deg = 1.0  # a remote source has no area of its own: the labels' tiles are the areas
    if tile_deg is not None:
        index = make_tiled_chips(gdf, desc, year, out_dir, cfg, tile_deg=tile_deg, bands=_bands(bands),
                                 workers=workers, scheduler=scheduler_address(scheduler), labels_path=labels_path)
    else:
        index = make_chips(gdf, open_imagery(desc, _bands(bands)), year, out_dir, cfg, labels_path=labels_path)
    out.print(f"{len(index)} chips -> {out_dir} ({index.split.value_counts().to_dict()})")
    if fmt == "mmseg":
        from minemap.mmseg import write_layout

        n = write_layout(out_dir, out_dir / "mmseg")
        out.print(f"{n} chips in the MMSegmentation layout -> {out_dir / 'mmseg' / str(year)}")


@app.command()
@_stage
def train(chips_dir: Annotated[Path, typer.Argument(help="chips folder")],
          out_dir: Annotated[Path, typer.Option("--out", help="model directory to write")],
          encoder: str = _MODEL.encoder, epochs: int = _TRAIN.epochs, batch_size: int = _TRAIN.batch_size,
          learning_rate: float = _TRAIN.learning_rate,
          head: Annotated[str, typer.Option(help="segformer, or fine: refined at full resolution (for mines a "
                                                 "few pixels wide)")] = _MODEL.head,
          pretrained: Annotated[Optional[str], typer.Option(help="local encoder checkpoint (file or folder)")] = None,
          resume: Annotated[bool, typer.Option(help="continue from out/train_state.pt")] = False,
          device: str = _TRAIN.device, seed: int = _TRAIN.seed, patience: int = _TRAIN.patience,
          stopping: Annotated[str, typer.Option(help="early: keep the best validation F1, stop after --patience "
                                                     "epochs without a better one; fixed: run every epoch, keep "
                                                     "the last weights")] = _TRAIN.stopping,
          min_val_f1: Annotated[float, typer.Option(help="validation F1 below this is an error")] = _TRAIN.min_val_f1,
          accept_weak_model: Annotated[bool, typer.Option(help="keep a model below --min-val-f1 without error")] = False,
          epoch_windows: int = _TRAIN.epoch_windows, precision: str = _TRAIN.precision,
          checkpoint_steps: Annotated[int, typer.Option(help="save the training state every this many steps")] = (
              _TRAIN.checkpoint_steps),
          loader_workers: Annotated[Optional[int], typer.Option(help="processes reading chips ahead (default: 0 "
                                                                     "on a CPU, up to 8 beside a GPU)")] = None,
          compile: Annotated[bool, typer.Option(help="torch.compile the network for training")] = _TRAIN.compile,
          bands: Annotated[Optional[str], typer.Option(help="MMSegmentation layout: the chips' bands")] = None,
          gsd_m: Annotated[float, typer.Option(help="MMSegmentation layout: the chips' pixel size, metres")] = 4.77):
    """Train a SegFormer on chips (a fixed schedule by default, or until validation F1 stalls with --stopping
    early), calibrated on the validation blocks. The chips folder
    may be the published study's MMSegmentation layout (<year>/img_dir|ann_dir/<split>/): it is indexed into
    OUT-chips/ first. Chips are streamed from disk; several GPUs: torchrun --nproc-per-node N -m minemap train."""
    from minemap.train import train as train_fn
    from minemap.train import weak_model_error

    if (chips_dir / "img_dir").is_dir():
        from minemap.mmseg import read_layout

        index_dir = out_dir.with_name(f"{out_dir.name}-chips")
        n = read_layout(chips_dir, index_dir, _bands(bands), gsd_m)
        out.print(f"{n} chips of the MMSegmentation layout {chips_dir} indexed -> {index_dir}")
        chips_dir = index_dir

    mcfg = _settings(ModelConfig, encoder=encoder, pretrained=pretrained, head=head)
    tcfg = _settings(TrainConfig, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, device=device,
                     seed=seed, patience=patience, stopping=stopping, min_val_f1=min_val_f1,
                     epoch_windows=epoch_windows,
                     precision=precision, checkpoint_steps=checkpoint_steps, loader_workers=loader_workers,
                     compile=compile)
    card = train_fn(chips_dir, out_dir, tcfg, mcfg, resume=resume)
    out.print(f"model -> {out_dir}: threshold {card.threshold:.2f}, val F1 {card.val_metrics.get('f1', 0):.3f}, "
              f"val IoU {card.val_metrics.get('iou', 0):.3f}, best epoch {card.best_epoch} ({card.stopped})")
    weak = weak_model_error(card, min_val_f1, out_dir, tcfg.min_val_pixels)
    if weak is not None and not accept_weak_model:
        raise weak


@app.command()
@_stage
def predict(model_dir: Annotated[Path, typer.Option("--model", help="model directory")],
            imagery: Annotated[Path, typer.Option(help="imagery directory with one folder per year")],
            years: Annotated[str, typer.Option(help="e.g. 2019-2021 or 2016,2019")],
            out_dir: Annotated[Path, typer.Option("--out", help="folder of probability COGs")],
            tile_size: int = _PREDICT.tile_size, window_size: Optional[int] = _PREDICT.window_size,
            window_overlap: Optional[float] = _PREDICT.window_overlap, batch_size: int = _PREDICT.batch_size,
            workers: int = 1,
            device: str = _PREDICT.device, bands: BandsOpt = None, overwrite: bool = False,
            aoi: Annotated[Optional[str], typer.Option(help=AOI_HELP)] = None,
            scheduler: Annotated[Optional[str], typer.Option(
                help="Dask scheduler address, e.g. tcp://host:8786")] = None):
    """Probability COGs per tile and year (uint8, P x 250, nodata 255); resumes unfinished tiles."""
    from minemap.aoi import parse_aoi
    from minemap.predict import predict as predict_fn

    cfg = _settings(PredictConfig, tile_size=tile_size, window_size=window_size, window_overlap=window_overlap,
                    batch_size=batch_size, device=device)
    scheduler = scheduler_address(scheduler)
    area = parse_aoi(aoi) if aoi is not None else None
    paths = predict_fn(model_dir, imagery, _years(years), out_dir, cfg, _bands(bands), workers, overwrite,
                       aoi=area, scheduler=scheduler)
    out.print(f"{len(paths)} probability rasters -> {out_dir}")


@app.command()
@_stage
def vectorize(prob_dir: Annotated[Path, typer.Argument(help="folder of probability COGs (one folder a year)")],
              years: Annotated[str, typer.Option(help="e.g. 2019-2021")],
              out_dir: Annotated[Path, typer.Option("--out", help="folder of <year>.parquet")],
              threshold: Annotated[Optional[float], typer.Option(help="default: the model card's")] = None,
              model_dir: Annotated[Optional[Path], typer.Option("--model", help="model whose threshold to use")] = None,
              min_area_m2: float = _VECTORIZE.min_area_m2, simplify_m: float = _VECTORIZE.simplify_m,
              max_rectangularity: Annotated[float, typer.Option(
                  help="drop outlines of 64 px or more filling more than this share of their enclosing rectangle "
                       "(fields); 1: shape never decides")] = _VECTORIZE.max_rectangularity,
              labels_path: Annotated[Optional[Path], typer.Option(
                  "--labels", help="the labels the model learnt from: more rectangles among them raise "
                                   "--max-rectangularity to their 99th percentile")] = None,
              fill_unobserved: Annotated[bool, typer.Option(
                  help="fill a year's unobserved pixels (cloud, shadow, no imagery) from the years beside it in "
                       "--years: mining where the previous year shows it and the next, if observed, too")
              ] = _VECTORIZE.fill_unobserved,
              workers: Annotated[int, typer.Option(help="local processes that polygonise tiles")] = 1,
              scheduler: Annotated[Optional[str], typer.Option(
                  help="Dask scheduler address (its workers must see the tiles' paths)")] = None):
    """Threshold probabilities into valid polygons (EPSG:4326), one GeoParquet a year."""
    from minemap.errors import InputError
    from minemap.model import read_card
    from minemap.vectorize import field_level
    from minemap.vectorize import vectorize as vectorize_fn

    cfg = _settings(VectorizeConfig, min_area_m2=min_area_m2, simplify_m=simplify_m, fill_unobserved=fill_unobserved,
                    max_rectangularity=max_rectangularity)
    scheduler = scheduler_address(scheduler)
    if threshold is None:
        if model_dir is None:
            raise InputError("give --threshold or --model (whose card holds the validated threshold)")
        threshold = read_card(model_dir).threshold
    if not 0 < threshold < 1:
        raise InputError(f"--threshold {threshold:g}: a probability threshold lies between 0 and 1 (e.g. 0.5)")
    labels = None
    if labels_path is not None:
        from minemap.labels import read_labels

        labels = read_labels([labels_path])[0]
    paths = vectorize_fn(prob_dir, _years(years), out_dir, threshold, cfg, workers, scheduler, progress=True,
                         fields=field_level(cfg, labels))
    out.print(f"{len(paths)} polygon files -> {out_dir} (threshold {threshold:.2f})")


@app.command()
@_stage
def postprocess(poly_dir: Annotated[Path, typer.Argument(help="folder of <year>.parquet polygons")],
                years: Annotated[str, typer.Option(help="e.g. 2019-2021")],
                out_path: Annotated[Path, typer.Option("--out", help="post-processed GeoParquet")],
                buffer_m: float = _POSTPROCESS.buffer_m,
                temporal: Annotated[str, typer.Option(help="provisional (default): drop polygons without a "
                                                           "neighbour-year overlap, but keep a confident one of the "
                                                           "first or last year as provisional; study: drop them all; "
                                                           "off")] = _POSTPROCESS.temporal,
                countries: Annotated[Optional[Path], typer.Option(help="country polygons (default: embedded Natural Earth 1:10m)")] = None):
    """Temporal consistency rule, country attribution, areas in km2."""
    from minemap.postprocess import postprocess_stage
    from minemap.vectorize import read_polygons

    cfg = _settings(PostprocessConfig, temporal=temporal, buffer_m=buffer_m, countries=countries)
    gdf = read_polygons([poly_dir / f"{y}.parquet" for y in _years(years)])
    res = postprocess_stage(gdf, out_path, cfg)
    out.print(f"{len(res)} of {len(gdf)} polygons kept -> {out_path}")


@app.command()
@_stage
def panel(postprocessed: Annotated[list[Path], typer.Argument(
              help="post-processed GeoParquet, or the published study's per-year GeoPackages (files or a folder)")],
          out_dir: Annotated[Path, typer.Option("--out", help="folder for the panel, its lineage and change tables")],
          max_gap: Annotated[int, typer.Option(help="years a mine may go unseen and keep its identity")] = _PANEL.max_gap,
          buffer_m: Annotated[float, typer.Option(help="polygons of different years within this distance "
                                                               "count as overlapping")] = _PANEL.buffer_m):
    """Track mines across years (mine_id, lineage events, district_id) and write the panel, its summary, the
    lineage tables and the change statistics."""
    from minemap.formats.vectors import read_vector
    from minemap.panel import build_panel, read_study_polygons, write_panel
    from minemap.formats.panel import STUDY_PATTERN

    settings = _settings(PanelConfig, max_gap=max_gap, buffer_m=buffer_m)  # checked before any file is read
    study = len(postprocessed) > 1 or postprocessed[0].is_dir() or STUDY_PATTERN.search(postprocessed[0].name)
    polygons = read_study_polygons(postprocessed) if study else read_vector(postprocessed[0])
    p, events, changes = build_panel(polygons, settings, where=", ".join(map(str, postprocessed)))
    paths = write_panel(p, events, out_dir, changes)
    out.print(f"{p.mine_id.nunique()} mines, {len(p)} mine-years -> {paths['parquet']}")


@app.command("export")
@_stage
def export_cmd(panel_path: Annotated[Path, typer.Argument(help="panel.parquet, or the run folder holding it")],
               out_dir: Annotated[Path, typer.Option("--out", help="folder for the exports")],
               formats: Annotated[str, typer.Option("--formats", help="comma-separated: gpkg (a layer a year), fgb "
                                                                     "(FlatGeobuf), csv (no geometry), study (the "
                                                                     "published study's per-year GeoPackages), card "
                                                                     "(DATASET.md)")] = "gpkg,fgb,csv,study,card",
               run_dir: Annotated[Optional[Path], typer.Option("--run", help="run folder the dataset card cites "
                                                                         "(default: the panel's folder)")] = None,
               licence: Annotated[str, typer.Option(help="licence of the polygons and tables, for the card")]
               = _EXPORT.licence):
    """Export a panel: GeoPackage, FlatGeobuf, CSV, the published study's layout, and a dataset card."""
    from minemap.export import export

    paths = export(panel_path, out_dir, [f.strip() for f in formats.split(",") if f.strip()], run_dir, licence)
    out.print(f"{len(paths)} exports -> {out_dir}: {', '.join(p.name for p in paths.values())}")


@app.command("report")
@_stage
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="a run folder (with panel.parquet)")],
               reference: Annotated[Optional[Path], typer.Option(help="reference polygons, to show the largest "
                                                                      "errors")] = None,
               out_path: Annotated[Optional[Path], typer.Option("--out", help="the page (default: "
                                                                              "RUN_DIR/report.html)")] = None):
    """A self-contained report.html: plots, accuracy with intervals, and an interactive map that opens offline."""
    from minemap.report import report

    dest = report(run_dir, out_path, reference)
    out.print(f"report -> {dest}")


@app.command()
@_stage
def evaluate(predicted: Annotated[Path, typer.Argument(help="panel or polygons with a 'year' column")],
             reference: Annotated[Path, typer.Option(help="reference polygons: a file with 'year', or a folder")],
             probabilities: Annotated[Path, typer.Option(help="folder of probability COGs (sets the grid)")],
             out_path: Annotated[Path, typer.Option("--out", help="metrics.json")],
             threshold: Optional[float] = None,
             chips: Annotated[Optional[Path], typer.Option(help="the training's chips folder: its test blocks are "
                                                               "the headline, every block beside it (in-sample)")] = None):
    """Pixel and object metrics per year against reference polygons (unobserved reference counted as missed)."""
    from minemap.formats.chips import split_blocks
    from minemap.evaluate import evaluate_stage
    from minemap.formats.vectors import read_vector

    res = evaluate_stage(read_vector(predicted), reference, probabilities, out_path, threshold,
                         splits=split_blocks(chips) if chips is not None else None)
    _print_metrics(res)


def _print_metrics(metrics: dict) -> None:
    scope = metrics.get("scope", "every pixel")
    table = Table(title=f"accuracy against the reference: {scope}; unobserved reference counted as missed",
                  title_justify="left")
    in_sample = any("all_blocks" in m for m in metrics["years"].values())
    for col in ("year", "precision", "recall", "F1", "IoU", "mines found", "reference unobserved") + \
            (("F1 all blocks (in-sample)",) if in_sample else ()):
        table.add_column(col, justify="right")
    for year, m in metrics["years"].items():
        px, ob = m["pixel"], m["object"]
        row = [year, *(f"{px[k]:.3f}" for k in ("precision", "recall", "f1", "iou")), f"{ob['recall']:.0%}",
               f"{m.get('unobserved', {}).get('reference_share', 0):.1%}"]
        if in_sample:
            row.append(f"{m['all_blocks']['pixel']['f1']:.3f}" if "all_blocks" in m else "")
        table.add_row(*row)
    px = metrics["overall"]["pixel"]
    row = ["all", *(f"{px[k]:.3f}" for k in ("precision", "recall", "f1", "iou")), "", ""]
    if in_sample:
        row.append(f"{metrics['overall'].get('all_blocks', {}).get('pixel', {}).get('f1', float('nan')):.3f}")
    table.add_row(*row)
    out.print(table)


def _print_result(res) -> None:
    out.print(f"panel    {res.panel}\n         {res.panel_gpkg}\nsummary  {res.summary}\nmodel    {res.model_dir}"
              f"\nrasters  {res.out / 'probabilities'}")
    if res.skipped:
        out.print(f"up to date, not redone: {', '.join(res.skipped)}")
    if res.metrics_data:
        out.print(f"metrics  {res.metrics}")
        _print_metrics(res.metrics_data)


# `run`'s options that set settings: option -> the settings (dotted keys of RunConfig) it sets; its defaults are
# None (or off), so that the configuration's apply (tests/test_cli_defaults.py checks both)
_RUN_FLAGS = {
    "workers": ("workers",), "encoder": ("model.encoder",), "epochs": ("train.epochs",),
    "chip_size": ("chips.chip_size",), "tile_size": ("predict.tile_size",), "threshold": ("vectorize.threshold",),
    "min_area_m2": ("vectorize.min_area_m2",), "buffer_m": ("postprocess.buffer_m",),
    "countries": ("postprocess.countries",), "device": ("train.device", "predict.device"),
    "hard_negatives": ("hard_negatives.enabled",), "model_dir": ("model.path",), "resample": ("predict.resample",),
    "accept_weak_model": ("accept_weak_model",),
}


@app.command()
@_stage
def run(config: Annotated[Optional[Path], typer.Argument(help="TOML config (flags override it)")] = None,
        labels_paths: Annotated[Optional[list[Path]], typer.Option("--labels", help="label file (repeatable)")] = None,
        imagery: Annotated[Optional[Path], typer.Option(help="imagery directory, one folder per year")] = None,
        train_year: Annotated[Optional[int], typer.Option(help="year the labels match")] = None,
        years: Annotated[Optional[str], typer.Option(help="years to map, e.g. 2019-2021")] = None,
        out_dir: Annotated[Optional[Path], typer.Option("--out", help="run directory")] = None,
        reference: Annotated[Optional[Path], typer.Option(help="reference polygons for metrics.json")] = None,
        aoi: Annotated[Optional[str], typer.Option(help=AOI_HELP)] = None,
        bands: BandsOpt = None,
        encoder: Annotated[Optional[str], typer.Option(help=f"mit-b0 ... mit-b5 (default {_MODEL.encoder})")] = None,
        epochs: Annotated[Optional[int], typer.Option(help="most training epochs (stops earlier when validation "
                                                           "stalls)")] = None,
        chip_size: Annotated[Optional[int], typer.Option(help=f"training chip side in pixels (default {_CHIPS.chip_size})")] = None,
        tile_size: Annotated[Optional[int], typer.Option(help="prediction tile side in pixels, on the global grid "
                                                              f"(default {_PREDICT.tile_size})")] = None,
        threshold: Annotated[Optional[float], typer.Option(help="probability threshold of the polygons (default: "
                                                                "validated on the training year)")] = None,
        min_area_m2: Annotated[Optional[float], typer.Option(help="drop polygons smaller than this, m2 (default "
                                                                  f"{_VECTORIZE.min_area_m2:g})")] = None,
        buffer_m: Annotated[Optional[float], typer.Option(help="temporal rule: a polygon is kept if one of an "
                                                               "adjacent year lies within this distance, m")] = None,
        countries: Annotated[Optional[Path], typer.Option(help="country polygons with iso3 and country columns "
                                                               "(default: embedded Natural Earth 1:10m)")] = None,
        workers: Annotated[Optional[int], typer.Option(help="local processes that predict")] = None,
        device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or mps")] = None,
        scheduler: Annotated[Optional[str], typer.Option(
            help="Dask scheduler address, e.g. tcp://host:8786: prediction runs on that cluster")] = None,
        hard_negatives: Annotated[Optional[bool], typer.Option(
            "--hard-negatives/--no-hard-negatives", help="mine hard negatives and fine-tune (default on)")] = None,
        model_dir: Annotated[Optional[Path], typer.Option(
            "--model", help="a trained model directory: map with it (no labels, chips or training)")] = None,
        resample: Annotated[bool, typer.Option(
            help="read imagery at the model's pixel size where it differs (else refused)")] = False,
        accept_weak_model: Annotated[bool, typer.Option(
            help="map with a model whose validation F1 is below train.min_val_f1")] = False,
        overwrite: Annotated[bool, typer.Option(help="redo finished steps")] = False):
    """Run every stage, from a TOML config or flags; a rerun resumes where it stopped."""
    from minemap.config import load_config
    from minemap.pipeline import run as run_fn

    given = {"workers": workers, "encoder": encoder, "epochs": epochs, "chip_size": chip_size, "tile_size": tile_size,
             "threshold": threshold, "min_area_m2": min_area_m2, "buffer_m": buffer_m, "countries": countries,
             "device": device, "hard_negatives": hard_negatives, "model_dir": model_dir,
             "resample": resample or None, "accept_weak_model": accept_weak_model or None}
    for option, value in given.items():
        if value is not None:
            for dotted in _RUN_FLAGS[option]:
                _flag("--" + option.replace("_", "-") if option != "model_dir" else "--model", dotted, value)
    scheduler = scheduler_address(scheduler)
    cfg = load_config(config, **{
        "labels": [str(p) for p in labels_paths] if labels_paths else None, "imagery": imagery,
        "train_year": train_year, "years": years, "out": out_dir, "reference": reference, "bands": _bands(bands),
        "aoi": aoi, "scheduler": scheduler,
        **{dotted: value for option, value in given.items() for dotted in _RUN_FLAGS[option]},
    })
    if cfg.scheduler and scheduler is None:  # the config file's
        cfg.scheduler = scheduler_address(cfg.scheduler, f"{config}: scheduler")
    _print_result(run_fn(cfg, overwrite=overwrite))


model_app = typer.Typer(no_args_is_help=True, help="Model directories: import the published study's model.")
app.add_typer(model_app, name="model")


@model_app.command("import-mmseg")
@_stage
def model_import_mmseg(
        checkpoint: Annotated[Path, typer.Argument(help="MMSegmentation SegFormer checkpoint (.pth)")],
        out_dir: Annotated[Path, typer.Option("--out", help="minemap model directory to write")],
        bands: Annotated[str, typer.Option(help="bands the model was trained on, in order")] = "red,green,blue",
        mean: Annotated[str, typer.Option(help="per-band mean of its normalisation (data_preprocessor)")]
        = "123.675,116.28,103.53",
        std: Annotated[str, typer.Option(help="per-band std of its normalisation")] = "58.395,57.12,57.375",
        gsd_m: Annotated[float, typer.Option(help="ground sample distance of its imagery, metres")] = 4.77,
        chip_size: Annotated[int, typer.Option(help="window side it was trained on, pixels")] = 512):
    """Import an MMSegmentation SegFormer (mit-b0..b5, e.g. the study's two-class model) as a minemap model."""
    from minemap.errors import InputError
    from minemap.mmseg import import_mmseg

    try:
        mean_v, std_v = [float(v) for v in mean.split(",")], [float(v) for v in std.split(",")]
    except ValueError:
        raise InputError("--mean/--std: expected numbers separated by commas") from None
    card = import_mmseg(checkpoint, out_dir, _bands(bands), mean_v, std_v, gsd_m, chip_size)
    out.print(f"{card.encoder} with MMSegmentation's head, bands {', '.join(card.bands)} -> {out_dir}")


review_app = typer.Typer(no_args_is_help=True, help="Review: the detections to look at first, and verdicts back.")
app.add_typer(review_app, name="review")


@review_app.command("export")
@_stage
def review_export(run_dir: Annotated[Path, typer.Argument(help="a run folder (with panel.parquet)")],
                  year: Annotated[int, typer.Option(help="the year to review")],
                  out_dir: Annotated[Optional[Path], typer.Option("--out", help="folder (default: "
                                                                               "RUN_DIR/review/YEAR)")] = None,
                  limit: Annotated[int, typer.Option(help="items, highest priority first")] = 200,
                  model_dir: Annotated[Optional[Path], typer.Option(
                      "--model", help="the model a run made with --model mapped with: its card's threshold "
                                      "(used where the run records none)")] = None,
                  threshold: Annotated[Optional[float], typer.Option(
                      help="the threshold the polygons were drawn at (default: the one the run records)")] = None):
    """The detections a person should look at first (new, unsure, large, away from labels; labels not found) as
    a GeoPackage with an empty `verdict` field, a QGIS style and an image chip each."""
    from minemap.errors import InputError
    from minemap.review import export_review, review_threshold

    if limit < 1:
        raise InputError(f"--limit {limit}: at least 1 item")
    if threshold is not None:
        if not 0 < threshold < 1:
            raise InputError(f"--threshold {threshold:g}: a probability threshold lies between 0 and 1 (e.g. 0.5)")
        source = "--threshold"
    else:
        threshold, source = review_threshold(run_dir, model_dir)
    gpkg = export_review(run_dir, year, out_dir, limit, threshold=threshold)
    out.print(f"review {year} -> {gpkg}, low confidence judged against threshold {threshold:.3f} (from {source}); "
              "set verdict to mine, not_mine or unsure, then `minemap review import`")


@review_app.command("import")
@_stage
def review_import(path: Annotated[Path, typer.Argument(help="a reviewed review_<year>.gpkg")],
                  run_dir: Annotated[Path, typer.Option("--run", help="the run folder the verdicts belong to")]):
    """Keep a reviewed file's verdicts in RUN/review/verdicts.parquet."""
    from minemap.review import import_review

    counts = import_review(path, run_dir)
    out.print(f"verdicts kept: {', '.join(f'{k} {v}' for k, v in counts.items())} -> {run_dir / 'review'} "
              "(the next `minemap run` with this --out trains with those of its training year)")


imagery_app = typer.Typer(no_args_is_help=True, help="Imagery sources: fill a remote source's cache ahead of a run.")
app.add_typer(imagery_app, name="imagery")


@imagery_app.command("fetch")
@_stage
def imagery_fetch(
        config: Annotated[Optional[Path], typer.Argument(help="TOML config whose [imagery] table names the source")] = None,
        years: Annotated[str, typer.Option(help="years, e.g. 2019-2021")] = "",
        source: Annotated[Optional[str], typer.Option(help="stac or planet (the sources that fetch)")] = None,
        url: Annotated[Optional[str], typer.Option(help="API root (STAC, or Planet basemaps)")] = None,
        collection: Annotated[Optional[str], typer.Option(help="STAC collection, e.g. sentinel-2-l2a")] = None,
        aoi: Annotated[Optional[str], typer.Option(help="area as west,south,east,north in degrees")] = None,
        months: Annotated[Optional[str], typer.Option(help="months of each year's composite, e.g. 6-11")] = None,
        cache: Annotated[Optional[Path], typer.Option(help="cache folder (default $MINEMAP_CACHE or "
                                                           "~/.cache/minemap)")] = None):
    """Build and cache a remote source's yearly composites for an area; report scenes found, the cloud-free
    share per tile and year, and bytes written."""
    from minemap.config import parse_years
    from minemap.errors import InputError
    from minemap.imagery import open_imagery

    if not years:
        raise InputError("--years: give the years to fetch, e.g. 2019-2021")
    bbox = None
    if aoi is not None:
        try:
            bbox = [float(v) for v in aoi.split(",")]
        except ValueError:
            raise InputError(f"--aoi {aoi!r}: expected west,south,east,north in degrees") from None
    desc = _imagery_config(config, {"bbox": bbox, "source": source, "url": url, "collection": collection,
                                    "months": months, "cache_dir": str(cache) if cache else None})
    src = open_imagery(desc)
    records = src.fetch(parse_years(years))
    if desc.source == "stac":
        table_out = Table("year", "tile", "scenes", "clear share", "bytes", "")
        for r in records:
            table_out.add_row(str(r["year"]), r["tile"], str(r["scenes"]), f"{r['clear_share']:.1%}",
                              f"{r['bytes']:,}", "cached" if r["cached"] else "fetched")
    else:
        table_out = Table("year", "quad", "mosaic chosen", "cloud score", "chosen by", "bytes", "")
        for r in records:
            table_out.add_row(str(r["year"]), r["quad"], r["mosaic"], f"{r['cloud_score']:.2f}",
                              r["chosen_by"].split(" (")[0], f"{r['bytes']:,}", "cached" if r["cached"] else "fetched")
    out.print(table_out)
    new = [r for r in records if not r["cached"]]
    out.print(f"{len(records)} composites ({len(new)} fetched, {len(records) - len(new)} already cached), "
              f"{sum(r['bytes'] for r in new):,} bytes written to {src.root}")


@app.command()
@_stage
def stages(run_dir: Annotated[Optional[Path], typer.Argument(help="a run folder: also which stages it finished")]
           = None):
    """The stages of `run` in order: the command that runs each alone, its settings table, what it is made from;
    with a run folder, which stages it recorded as finished (with its settings then: a rerun redoes those whose
    settings or inputs changed)."""
    from minemap.formats.run import RunFolder
    from minemap.manifest import Manifest
    from minemap.pipeline import STAGES

    done = set()
    if run_dir is not None:
        folder = RunFolder(run_dir)
        if not folder.manifest.is_file():
            from minemap.errors import InputError

            raise InputError(f"{run_dir}: not a run folder (no {folder.manifest.name})")
        done = {k.split(":", 1)[1] for k, _ in Manifest(folder.manifest, read_only=True).items()
                if k.startswith("stage:")}
    # "recorded": the run finished the stage once, with these settings or others (only `run` knows which)
    table = Table("stage", "command", "settings", "made from", *(["recorded"] if run_dir is not None else []))
    for s in STAGES:
        table.add_row(s.name, f"minemap {s.command}", escape(f"[{s.section}]") if s.section else "",
                      ", ".join(s.after) or "the labels' files",
                      *(["yes" if s.name in done else ""] if run_dir is not None else []))
    out.print(table)


@app.command()
@_stage
def demo(out_dir: Annotated[Path, typer.Option("--out", help="folder for the scene and the run")] = Path("demo-out"),
         epochs: Annotated[Optional[int], typer.Option(help="most training epochs (default: the run's)")] = None,
         overwrite: bool = False):
    """Build a synthetic multi-year scene with known truth and run the whole pipeline on it."""
    import time

    from minemap.pipeline import run_demo

    t0 = time.perf_counter()
    res = run_demo(out_dir, epochs=epochs, overwrite=overwrite)
    _print_result(res)
    out.print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def _imagery_config(config: Path | None, flags: dict | None = None, default_bbox=None):
    """A remote source's description from the ``[imagery]`` table of a TOML ``config`` (``cache_dir`` relative to
    it) and the flags given (``flags``: field -> value, None where not given; ``url`` names Planet's
    ``api_url``); ``default_bbox`` where neither gives an area (chips from anywhere give each tile its own). An
    invalid value is one line naming the flag that gave it, else the config's table."""
    import tomllib

    from pydantic import ValidationError

    from minemap.config import _flatten_error
    from minemap.errors import InputError
    from minemap.imagery.planet import PlanetImageryConfig
    from minemap.imagery.stac import StacImageryConfig

    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    table: dict = {}
    if config is not None:
        try:
            whole = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{config}: not a readable TOML config ({e})") from None
        if "imagery" not in whole:
            raise InputError(f"{config}: no [imagery] table: name the remote source there (source, url, "
                             "collection, bbox), or leave the config out and give --url and --aoi")
        table = whole["imagery"]
        if not isinstance(table, dict):
            raise InputError(f"{config}: imagery is a local folder ({table}); give the folder itself, or name a "
                             "remote source in the [imagery] table")
        table = dict(table)
        if isinstance(table.get("cache_dir"), str):
            table["cache_dir"] = str(config.parent / table["cache_dir"])
    table.update(flags)
    table.setdefault("source", "stac")
    if default_bbox is not None and "bbox" not in table:
        w, s, e, n = (float(v) for v in default_bbox)
        table["bbox"] = [max(w, -180.0), max(s, -90.0), min(max(e, w + 1e-6), 180.0), min(max(n, s + 1e-6), 90.0)]
    kinds = {"stac": StacImageryConfig, "planet": PlanetImageryConfig}
    if table["source"] not in kinds:
        where = f"{config}: " if config is not None else ""
        raise InputError(f"{where}source {table['source']!r}: name a remote source (stac or planet) here; a local "
                         "folder is given as the folder itself")
    if table["source"] == "planet":
        if "url" in table:
            table["api_url"] = table.pop("url")
        table.pop("collection", None)
    try:
        return kinds[table["source"]].model_validate(table)
    except ValidationError as e:  # named by the option that gave the value, else by the config's table
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        key = "url" if field == "api_url" else field
        flag = {"url": "--url", "bbox": "--aoi", "cache_dir": "--cache"}.get(key, f"--{key}")
        if key in flags:
            raise InputError(f"{flag}: {first['msg']}") from None
        where = f"{config}: " if config is not None else ""
        hint = f" (give {flag})" if config is None and key in ("url", "bbox") else ""
        raise InputError(f"{where}imagery: {_flatten_error(e)}{hint}") from None


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
