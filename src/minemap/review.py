"""Review: the detections a person should look at first, and the verdicts a person gives them.

``review export`` writes, for one year of a run, the detections (and the labels no detection found) in order of
priority as ``review_<year>.gpkg`` (layer ``review``, EPSG:4326, :data:`REVIEW_COLUMNS`, an empty ``verdict``
for the reviewer), a QGIS style beside it (``review_<year>.qml``: colours by verdict, a drop-down of the
allowed verdicts) and a PNG per item (``chips/<review_id>.png``: the image with the outline). Priority adds the
weights of the item's reasons (:data:`REASONS`): away from every label, a label no detection found, new this
year, low calibrated confidence (within :data:`LOW_MARGIN` above the threshold), large (the year's top tenth).

``review import`` checks a reviewed file (the verdicts must be one of :data:`VERDICTS` or empty, the layer in
EPSG:4326, the columns those written) and keeps its verdicts in ``<run>/review/verdicts.parquet``, one row per
reviewed item, the latest verdict winning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from tqdm.auto import tqdm

from minemap._io import atomic_path, stable_hash
from minemap.errors import InputError
from minemap.formats.panel import read_panel
from minemap.formats.run import CARD, RunFolder
from minemap.model import read_card
from minemap.views import Rasters, plot_outline
from minemap.geo import WGS84, area_km2
from minemap.formats.vectors import read_vector, write_geoparquet

log = logging.getLogger(__name__)
VERDICTS = ("mine", "not_mine", "unsure")
REASONS = {"away from labels": 3, "label not detected": 3, "new this year": 2, "low confidence": 2, "large": 1}
LOW_MARGIN = 0.15
REVIEW_COLUMNS = ["review_id", "kind", "mine_id", "year", "priority", "reasons", "area_km2", "mean_probability",
                  "chip", "verdict", "note", "geometry"]
_STYLE = {"": ("255,215,0,70", "230,180,0,255", "to review"), "mine": ("220,60,40,90", "200,30,20,255", "mine"),
          "not_mine": ("60,120,220,60", "30,80,200,255", "not a mine"),
          "unsure": ("160,160,160,70", "90,90,90,255", "unsure")}


def review_candidates(panel: gpd.GeoDataFrame, year: int, labels: gpd.GeoDataFrame | None = None,
                      threshold: float = 0.5) -> gpd.GeoDataFrame:
    """The year's detections, and the labels none of them meets, with their reasons and priority, highest
    first (ties: larger first)."""
    det = panel[panel.year == year].reset_index(drop=True)
    area = det.area_km2.to_numpy(float)
    reasons = [[] for _ in range(len(det))]

    def flag(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask):
            reasons[i].append(reason)

    geoms = np.asarray(det.geometry.values)
    label_geoms = np.asarray(labels.to_crs(WGS84).geometry.values) if labels is not None and len(labels) else None
    if label_geoms is not None:
        di, li = shapely.STRtree(label_geoms).query(geoms, predicate="intersects")
        flag(~np.isin(np.arange(len(det)), di), "away from labels")
    flag((det.first_year.to_numpy() == year) & (year > panel.year.min()), "new this year")
    flag(det.mean_probability.fillna(1.0).to_numpy() < threshold + LOW_MARGIN, "low confidence")
    if len(det):
        flag(area >= np.quantile(area, 0.9), "large")
    rows = det.assign(kind="detection", reasons=["; ".join(r) for r in reasons],
                      priority=[sum(REASONS[x] for x in r) for r in reasons])
    frames = [rows]
    if label_geoms is not None:
        missed = np.setdiff1d(np.arange(len(label_geoms)), li)
        frames.append(gpd.GeoDataFrame({
            "kind": "label", "mine_id": "", "year": year, "reasons": "label not detected",
            "priority": REASONS["label not detected"], "area_km2": area_km2(label_geoms[missed]),
            "mean_probability": np.nan}, geometry=label_geoms[missed], crs=WGS84))
    out = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=WGS84)
    out = out.sort_values(["priority", "area_km2"], ascending=[False, False]).reset_index(drop=True)
    out["review_id"] = np.arange(1, len(out) + 1)
    out["chip"] = ""
    out["verdict"] = ""
    out["note"] = ""
    out["year"] = int(year)
    return out[REVIEW_COLUMNS]


def qgis_style() -> str:
    """A QGIS layer style (.qml): fills coloured by verdict, and the verdict field edited from a drop-down."""
    cats = "".join(f'<category value={quoteattr(v)} symbol="{i}" label={quoteattr(s[2])} render="true"/>'
                   for i, (v, s) in enumerate(_STYLE.items()))
    symbols = "".join(
        f'<symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0"><layer class="SimpleFill" '
        f'enabled="1" locked="0" pass="0"><Option type="Map"><Option name="color" value="{fill}" type="QString"/>'
        f'<Option name="outline_color" value="{line}" type="QString"/><Option name="outline_width" value="0.6" '
        f'type="QString"/><Option name="style" value="solid" type="QString"/></Option></layer></symbol>'
        for i, (fill, line, _) in enumerate(_STYLE.values()))
    choices = "".join(f'<Option type="Map"><Option name={quoteattr(s[2])} value={quoteattr(v)} type="QString"/>'
                      "</Option>" for v, s in _STYLE.items())
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            '<qgis version="3.28" styleCategories="Symbology|Fields|Forms">'
            f'<renderer-v2 type="categorizedSymbol" attr="verdict" symbollevels="0" forceraster="0">'
            f"<categories>{cats}</categories><symbols>{symbols}</symbols></renderer-v2>"
            '<fieldConfiguration><field name="verdict" configurationFlags="None"><editWidget type="ValueMap">'
            f'<config><Option type="Map"><Option name="map" type="List">{choices}</Option></Option></config>'
            "</editWidget></field></fieldConfiguration></qgis>\n")


def _recorded(path: Path) -> float | None:
    """The ``threshold`` a run's JSON file records (None: no such file, or it records none); a file that is
    there but cannot be read is an error, not a reason to guess."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("threshold")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, not a JSON object
        raise InputError(f"{path}: cannot read the threshold the run used ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}: threshold {value!r} is not a number") from None
    if not 0 < value < 1:
        raise InputError(f"{path}: threshold {value:g} is not a probability between 0 and 1")
    return value


def review_threshold(run_dir: Path, model_dir: Path | None = None) -> tuple[float, str]:
    """The threshold the run's polygons were drawn at (low confidence is judged against it) and the file it
    was read from: the run's ``threshold.json`` (a run that trained its model), its ``metrics.json`` (a run
    with a reference), its ``model/model.json``; else the card of ``model_dir``, the model a run made with
    ``--model`` mapped with (such a run keeps no model folder). None of them: :class:`InputError`, never a
    guess of 0.5, which would misjudge every detection of a model whose threshold is another."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    for path in (folder.threshold, folder.metrics, folder.card):
        value = _recorded(path)
        if value is not None:
            return value, str(path)
    if model_dir is not None:
        return read_card(model_dir).threshold, str(Path(model_dir) / CARD)
    raise InputError(f"{run_dir}: the run records no threshold (no threshold.json, metrics.json or model/model.json: "
                     "a run made with --model keeps none): give --model, the model it mapped with, or --threshold")


def export_review(run_dir: Path, year: int, out_dir: Path | None = None, limit: int = 200,
                  progress: bool = True, threshold: float | None = None, model_dir: Path | None = None) -> Path:
    """Write the review file of ``year`` for the run at ``run_dir`` (default ``run_dir/review/<year>/``): the
    ``limit`` items of highest priority, their QGIS style and image chips. Returns the GeoPackage's path.
    ``threshold``: the one the polygons were drawn at (default: :func:`review_threshold` of the run, or of
    ``model_dir``'s card)."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    panel = read_panel(run_dir)
    if year not in set(panel.year.astype(int)):
        raise InputError(f"{folder.panel}: no mines in {year} (years: "
                         f"{', '.join(map(str, sorted(set(panel.year.astype(int)))))})")
    if threshold is None:
        threshold, source = review_threshold(run_dir, model_dir)
    else:
        source = "given"
    log.info("review %d: threshold %.3f (%s)", year, threshold, source)
    labels_path = folder.labels
    labels = gpd.read_parquet(labels_path) if labels_path.is_file() else None
    items = review_candidates(panel, year, labels, threshold).head(limit)
    out_dir = Path(out_dir) if out_dir else folder.review / str(year)
    (out_dir / "chips").mkdir(parents=True, exist_ok=True)
    rasters = Rasters(run_dir)
    for row in tqdm(items.itertuples(), total=len(items), desc=f"review chips {year}", disable=not progress,
                    leave=False):
        png = plot_outline(rasters, year, row.geometry)
        if png is not None:
            dest = out_dir / "chips" / f"{row.review_id}.png"
            with atomic_path(dest) as tmp:
                Path(tmp).write_bytes(png)
            items.loc[items.review_id == row.review_id, "chip"] = f"chips/{row.review_id}.png"
    gpkg = out_dir / f"review_{year}.gpkg"
    with atomic_path(gpkg) as tmp:
        items.to_file(tmp, layer="review", driver="GPKG")
    with atomic_path(out_dir / f"review_{year}.qml") as tmp:
        Path(tmp).write_text(qgis_style(), encoding="utf-8")
    log.info("review %d: %d items -> %s", year, len(items), gpkg)
    return gpkg


def read_verdicts(path: Path) -> gpd.GeoDataFrame:
    """A reviewed file, checked: one line naming the file for missing columns, unknown verdicts or another
    CRS. Returns the rows with a verdict."""
    path = Path(path)
    gdf = read_vector(path)
    missing = [c for c in ("review_id", "kind", "year", "verdict") if c not in gdf.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (not a file of `minemap review export`?)")
    if not gdf.crs.equals(WGS84):
        raise InputError(f"{path}: review files are in EPSG:4326, not {gdf.crs.to_string()}")
    verdict = gdf["verdict"].fillna("").astype(str).str.strip()
    unknown = sorted(set(verdict) - set(VERDICTS) - {""})
    if unknown:
        raise InputError(f"{path}: unknown verdict(s) {', '.join(map(repr, unknown))}: use "
                         f"{', '.join(VERDICTS)} or leave empty")
    gdf = gdf.assign(verdict=verdict)
    return gdf[gdf.verdict != ""].reset_index(drop=True)


def import_review(path: Path, run_dir: Path) -> dict[str, int]:
    """Keep the verdicts of a reviewed file in ``run_dir/review/verdicts.parquet`` (a later verdict on the same
    item replaces the earlier). Returns the count of each verdict kept there."""
    got = read_verdicts(path)
    dest = RunFolder(run_dir).verdicts
    cols = ["review_id", "kind", "mine_id", "year", "verdict", "note", "geometry"]
    got = got.assign(**{c: "" for c in ("mine_id", "note") if c not in got.columns})[cols]
    if dest.is_file():
        old = gpd.read_parquet(dest)
        got = gpd.GeoDataFrame(pd.concat([old, got], ignore_index=True), crs=WGS84)
    # the same item: the same year, kind and outline (review ids are per export)
    outline = shapely.to_wkb(np.asarray(got.geometry.values), hex=True)
    got = got.assign(_key=got.year.astype(str) + got.kind + outline)
    got = got.drop_duplicates("_key", keep="last").drop(columns="_key").reset_index(drop=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_geoparquet(gpd.GeoDataFrame(got, crs=WGS84), dest)
    return {v: int((got.verdict == v).sum()) for v in VERDICTS}


# -- verdicts back into training ---------------------------------------------------------------------------------

MATCH_IOU = 0.5  # a "not_mine" label verdict drops the labels its outline matches at least this well


@dataclass
class TrainingVerdicts:
    """The verdicts a training can use: those of its training year (the year the chips are cut from; a verdict
    on another year's image says nothing certain about the training year's). EPSG:4326 outlines."""

    positives: np.ndarray  # detections confirmed as mines: added to the labels
    drop_labels: np.ndarray  # labels rejected as not mines: removed from the labels
    rejected: np.ndarray  # detections rejected as not mines: training chips of their own, taught as background
    unsure: np.ndarray  # neither taught as mine nor as background: ignored in every chip
    other_years: int = 0  # verdicts of other years, not used

    @classmethod
    def none(cls) -> TrainingVerdicts:
        empty = np.empty(0, dtype=object)
        return cls(empty, empty, empty, empty)

    def counts(self) -> dict[str, int]:
        return {"mines_added": len(self.positives), "labels_dropped": len(self.drop_labels),
                "not_mine": len(self.rejected), "unsure": len(self.unsure), "other_years_unused": self.other_years}

    def labels_key(self) -> str | None:
        """What the labels depend on (None: no verdict changes them)."""
        return _outlines_key(self.positives, self.drop_labels)

    def negatives_key(self) -> str | None:
        """What the chips depend on beyond the labels: rejected detections and unsure outlines (None: none)."""
        return _outlines_key(self.rejected, self.unsure)


def _outlines_key(*groups: np.ndarray) -> str | None:
    if not any(len(g) for g in groups):
        return None
    return stable_hash([sorted(shapely.to_wkb(g, hex=True).tolist()) for g in groups])


def training_verdicts(path: Path, train_year: int) -> TrainingVerdicts:
    """The verdicts kept in ``path`` (``RUN/review/verdicts.parquet``) that a training of ``train_year`` uses:
    a detection marked ``mine`` becomes a label, a label marked ``not_mine`` is dropped, a detection marked
    ``not_mine`` gets training chips of its own, taught as background (minemap.chips.make_chips), an ``unsure``
    outline is ignored in every chip; a label marked ``mine`` is one already. Verdicts of other years are
    counted, not used."""
    path = Path(path)
    if not path.is_file():
        return TrainingVerdicts.none()
    try:
        got = gpd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise InputError(f"{path}: not a verdicts file of `minemap review import` ({e})") from None
    missing = [c for c in ("kind", "year", "verdict") if c not in got.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (written by `minemap review import`)")
    got = got.to_crs(WGS84)
    now = got[got.year.astype(int) == int(train_year)]
    geoms = np.asarray(now.geometry.values)
    kind, verdict = now.kind.to_numpy(), now.verdict.to_numpy()
    det = kind == "detection"
    return TrainingVerdicts(positives=geoms[det & (verdict == "mine")],
                            drop_labels=geoms[(kind == "label") & (verdict == "not_mine")],
                            rejected=geoms[det & (verdict == "not_mine")], unsure=geoms[verdict == "unsure"],
                            other_years=int(len(got) - len(now)))


def apply_to_labels(labels: gpd.GeoDataFrame, verdicts: TrainingVerdicts) -> gpd.GeoDataFrame:
    """Cleaned labels (EPSG:4326, minemap.labels' columns) less those a reviewer rejected (outline IoU >=
    :data:`MATCH_IOU`), plus the detections a reviewer confirmed (source ``review``)."""
    if len(verdicts.drop_labels) and len(labels):
        geoms = np.asarray(labels.geometry.values)
        li, di = shapely.STRtree(geoms).query(verdicts.drop_labels, predicate="intersects")[::-1]
        inter = shapely.area(shapely.intersection(geoms[li], verdicts.drop_labels[di]))
        union = shapely.area(shapely.union(geoms[li], verdicts.drop_labels[di]))
        drop = np.unique(li[inter >= MATCH_IOU * union])
        labels = labels.drop(index=labels.index[drop])
    if len(verdicts.positives):
        parts = shapely.get_parts(shapely.make_valid(verdicts.positives))
        parts = parts[(shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)]
        start = int(labels.label_id.max()) + 1 if len(labels) else 1
        added = gpd.GeoDataFrame({"label_id": np.arange(start, start + len(parts)), "source": "review",
                                  "source_id": [f"review:{i}" for i in range(len(parts))]},
                                 geometry=parts, crs=WGS84)
        labels = gpd.GeoDataFrame(pd.concat([labels, added], ignore_index=True), crs=WGS84)
    return labels.reset_index(drop=True)
