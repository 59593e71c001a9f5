"""Exports of a panel: other formats, the published study's layout, and a dataset card.

``panel.parquet`` (GeoParquet) is the reference; from it, each written atomically:

- ``gpkg``: ``panel.gpkg``, one layer a year (``mines_<year>``);
- ``fgb``: ``panel.fgb`` (FlatGeobuf, every year, with its ``year`` column);
- ``csv``: ``panel.csv``, the panel without geometry, with ``lon``/``lat`` of a point inside each outline;
- ``study``: ``study/global_mining_polygons_predicted_<year>_postprocessed.gpkg``, the layout of the published
  dataset (Sepin et al. 2025) as a drop-in for its users: ``id, iso_a3, country_name, year, area`` (m2),
  EPSG:4326, one file a year;
- ``card``: ``DATASET.md``, the dataset card: what the data is, where it comes from (imagery, model card,
  threshold), its accuracy where a reference was given, licence, how to cite, and every column with its unit.

The lineage (``mines``, ``events``) and change (``changes``) tables are written by the panel stage, as Parquet
and CSV, beside ``panel.parquet``.
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from minemap import __version__
from minemap._io import atomic_path, read_json
from minemap.errors import InputError
from minemap.formats.run import RunFolder
from minemap.formats.panel import (CHANGE_COLUMNS, EVENT_COLUMNS, LINEAGE_COLUMNS, PANEL_COLUMNS, STUDY_NAME,
                                   read_panel)

log = logging.getLogger(__name__)
FORMATS = ("gpkg", "fgb", "csv", "study", "card")
DEFAULT_LICENCE = "CC-BY-4.0"
EXPORT_FILES = {"gpkg": "panel.gpkg", "fgb": "panel.fgb", "csv": "panel.csv", "study": "study", "card": "DATASET.md"}

CONTENTS = {
    "gpkg": "`panel.gpkg` | the panel as a GeoPackage, a layer a year",
    "fgb": "`panel.fgb` | the panel as FlatGeobuf",
    "csv": "`panel.csv` | the panel without geometry (`lon`, `lat`: a point inside the outline)",
    "study": "`study/` | the published study's layout, one GeoPackage a year",
}
COLUMNS: dict[str, dict[str, str]] = {
    "panel": {
        "mine_id": "text: the mine's identity across years, the geohash (~5 m) of a point inside its first outline",
        "district_id": "text: the connected component of overlapping outlines across all years",
        "year": "integer: the year of the imagery",
        "iso3": "text: ISO 3166-1 alpha-3 code of the country holding most of the outline (empty offshore)",
        "country": "text: that country's name",
        "first_year": "integer: the mine's first year in the panel",
        "area_km2": "km2, on the WGS84 ellipsoid (equal-area projection)",
        "mean_probability": "0-1: the calibrated probability of mining, averaged over the outline",
        "provisional": "true for an outline of the first or last year without an overlapping outline in the "
                       "adjacent year, kept because the model is confident; a run that adds that year confirms "
                       "or drops it",
        "filled_share": "0-1: share of the outline the year did not observe (cloud, shadow, no imagery), taken as "
                        "mining because the previous year shows it and the next year, where observed, too "
                        "(`vectorize.fill_unobserved`); 0: observed throughout",
        "geometry": "polygon, EPSG:4326 (longitude, latitude in degrees)",
    },
    "mines": {
        "mine_id": "text", "district_id": "text", "first_year": "integer", "last_year": "integer",
        "years_seen": "integer: years with an outline", "years": "text: those years, ';'-separated",
        "max_area_km2": "km2: the largest outline", "iso3": "text: of the largest outline",
        "country": "text: of the largest outline", "split_from": "text: the mine it split from, if any",
    },
    "events": {
        "year": "integer", "kind": "appeared, reappeared, split, merged or disappeared",
        "mine_id": "text: the mine the event is about (for merged: the one carried on)",
        "parent_ids": "text: ';'-separated mine ids before the event",
        "child_ids": "text: ';'-separated mine ids after it",
    },
    "changes": {
        "iso3": "text", "country": "text", "year": "integer", "n_mines": "count",
        "area_km2": "km2 of mining area", "new_km2": "km2: outlines meeting none of the previous year's",
        "expanded_km2": "km2: parts of the other outlines outside the previous year's",
        "shrunk_km2": "km2: parts of the previous year's outlines (still met) outside this year's",
        "abandoned_km2": "km2: previous-year outlines meeting none of this year's",
    },
}



def export(panel_path: Path, out_dir: Path, formats: list[str] | tuple[str, ...] = FORMATS,
           run_dir: Path | None = None, licence: str = DEFAULT_LICENCE) -> dict[str, Path]:
    """Write the panel at ``panel_path`` (a file or the folder holding ``panel.parquet``) in ``formats`` into
    ``out_dir``. ``run_dir``: the run whose model card, threshold, imagery and metrics the dataset card cites
    (default: the panel's folder)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InputError(f"unknown export format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    panel = read_panel(panel_path)
    panel_file = Path(panel_path) if Path(panel_path).is_file() else Path(panel_path) / "panel.parquet"
    run_dir = Path(run_dir) if run_dir else panel_file.parent
    out_dir = Path(out_dir)
    years = sorted(int(y) for y in panel["year"].unique())
    written: dict[str, Path] = {}
    if "gpkg" in formats:
        written["gpkg"] = out_dir / EXPORT_FILES["gpkg"]
        with atomic_path(written["gpkg"]) as tmp:
            if not years:
                panel.to_file(tmp, driver="GPKG", layer="mines")
            for y in years:
                panel[panel.year == y].to_file(tmp, driver="GPKG", layer=f"mines_{y}")
    if "fgb" in formats:
        written["fgb"] = out_dir / EXPORT_FILES["fgb"]
        with atomic_path(written["fgb"]) as tmp:
            panel.to_file(tmp, driver="FlatGeobuf")
    if "csv" in formats:
        written["csv"] = out_dir / EXPORT_FILES["csv"]
        inside = shapely.point_on_surface(np.asarray(panel.geometry.values))
        table = pd.DataFrame(panel.drop(columns="geometry")).assign(lon=shapely.get_x(inside),
                                                                    lat=shapely.get_y(inside))
        with atomic_path(written["csv"]) as tmp:
            table.to_csv(tmp, index=False, float_format="%.7g")
    if "study" in formats:
        written["study"] = out_dir / EXPORT_FILES["study"]
        with atomic_path(written["study"]) as tmp:
            tmp.mkdir(parents=True)
            kept = panel[~panel["provisional"].astype(bool)]  # the study's rule keeps no provisional outline
            for y in years:
                write_study_year(kept[kept.year == y], tmp / STUDY_NAME.format(year=y))
    if "card" in formats:
        written["card"] = out_dir / EXPORT_FILES["card"]
        with atomic_path(written["card"]) as tmp:
            tmp.write_text(dataset_card(panel, run_dir, licence, formats))
    return written


def write_study_year(panel_year: gpd.GeoDataFrame, dest: Path) -> None:
    """One year in the published study's layout: id, iso_a3, country_name, year, area (m2), EPSG:4326."""
    gdf = gpd.GeoDataFrame({
        "id": np.arange(1, len(panel_year) + 1, dtype=np.int64),
        "iso_a3": panel_year["iso3"].fillna("-99").to_numpy(),
        "country_name": panel_year["country"].to_numpy(),
        "year": panel_year["year"].astype(np.int64).to_numpy(),
        "area": (panel_year["area_km2"] * 1e6).to_numpy(),
    }, geometry=panel_year.geometry.values, crs="EPSG:4326")
    gdf.to_file(dest, driver="GPKG", layer=dest.stem)


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def dataset_card(panel: gpd.GeoDataFrame, run_dir: Path, licence: str = DEFAULT_LICENCE,
                 formats: list[str] | tuple[str, ...] = FORMATS) -> str:
    """The dataset card (Markdown) of a panel, citing what the run directory holds; its contents list the
    exports in ``formats``."""
    folder = RunFolder(run_dir)
    card_path, thr_path, imagery_path, metrics_path = folder.card, folder.threshold, folder.imagery_record, folder.metrics
    card, card_why = read_json(card_path)
    thr, thr_why = read_json(thr_path)
    imagery, imagery_why = read_json(imagery_path)
    metrics, metrics_why = read_json(metrics_path)
    years = sorted(int(y) for y in panel["year"].unique())
    lines = [
        "# Mining areas panel", "",
        f"Mining areas mapped from satellite imagery by minemap {__version__}, "
        f"{years[0]}-{years[-1]} ({len(years)} years)." if years else "An empty panel.",
        f"{panel.mine_id.nunique():,} mines, {len(panel):,} mine-years, in {panel.iso3.nunique()} countries; "
        f"written {date.today().isoformat()}.", "",
        "## Contents", "",
        "| file | what |", "| --- | --- |",
        "| `panel.parquet` | GeoParquet (the reference): one row per mine and year |",
        *(f"| {CONTENTS[f]} |" for f in formats if f in CONTENTS),
        "| `mines.*`, `events.*` | lineage: one row per mine; the events (appeared, reappeared, split, merged, "
        "disappeared) |",
        "| `changes.*` | per country and year: new, expanded, shrunk and abandoned km2 |", "",
        "## Per year", "",
        "| year | mines | km2 | of them provisional (mines, km2) |", "| --- | --- | --- | --- |",
    ]
    provisional = panel["provisional"].astype(bool)
    per_year = panel.assign(p_km2=panel["area_km2"].where(provisional, 0.0), p=provisional).groupby("year").agg(
        n=("mine_id", "nunique"), km2=("area_km2", "sum"), p=("p", "sum"), p_km2=("p_km2", "sum"))
    lines += [f"| {y} | {int(r.n):,} | {r.km2:,.2f} | {int(r.p):,}, {r.p_km2:,.2f} |" for y, r in per_year.iterrows()]
    if provisional.any():
        lines += ["", f"{int(provisional.sum()):,} mine-years are provisional: outlines of the first or last year "
                      "without an overlapping outline in the adjacent year, kept because the model is confident "
                      "(`postprocess.temporal = \"provisional\"`); the study's rule would drop them, and the "
                      "`study/` layout leaves them out."]
    filled = panel["filled_share"].fillna(0.0)  # read_panel gives older panels the column
    if (filled > 0).any():
        km2 = (panel["area_km2"] * filled).groupby(panel["year"]).sum()
        lines += ["", "Unobserved ground filled from the years beside it (`filled_share`; cloud, shadow or no "
                      "imagery in that year, mining in the previous year and, where observed, the next): "
                      + ", ".join(f"{y} {v:,.2f} km2" for y, v in km2.items() if v > 0) + "."]
    lines += ["", "## Sources", ""]
    if imagery:
        src = imagery.get("source", {})
        lines.append(f"- Imagery: {src.get('source', 'unknown')} source"
                     + (f" ({src.get('collection') or src.get('url') or ''})" if src.get("collection") or src.get("url")
                        else "") + f", bands {', '.join(imagery.get('bands', []))}.")
    elif imagery_why:
        lines.append(f"- Imagery: its record `{imagery_path}` could not be read ({imagery_why}).")
    else:
        lines.append("- Imagery: not recorded beside this panel (built from polygons alone).")
    if card_why:
        lines.append(f"- Model: its card `{card_path}` could not be read ({card_why}).")
    if thr_why:
        lines.append(f"- Threshold: its record `{thr_path}` could not be read ({thr_why}).")
    if card:
        lines.append(f"- Model: SegFormer {card.get('encoder')}, trained on {card.get('train_year')} chips of "
                     f"{card.get('chip_size')} px at {_fmt(card.get('gsd_m'), 1)} m; best of "
                     f"{card.get('epochs_trained')} epochs ({card.get('stopped')}); validation F1 "
                     f"{_fmt((card.get('val_metrics') or {}).get('f1'))}, test F1 "
                     f"{_fmt((card.get('test_metrics') or {}).get('f1'))}; probabilities calibrated "
                     f"({(card.get('calibration') or {}).get('method', 'none')}).")
        if (card.get("selection") or {}).get("training"):
            lines.append(f"- Training saw {card['selection']['training']}.")
        if (card.get("selection") or {}).get("validation"):
            by_year = (card.get("val_metrics") or {}).get("by_year") or {}
            lines.append(f"- Validation: {card['selection']['validation']}"
                         + ("; F1 at the threshold by year: " + ", ".join(f"{y} {_fmt(m.get('f1'))}"
                                                                          for y, m in by_year.items())
                            if by_year else "") + ".")
        if card.get("review"):
            r = card["review"]
            lines.append(f"- Reviewers' verdicts used in training: {r.get('mines_added', 0)} detections confirmed as "
                         f"mines (added to the labels), {r.get('labels_dropped', 0)} labels rejected, "
                         f"{r.get('not_mine', 0)} detections rejected (taught as background), "
                         f"{r.get('unsure', 0)} unsure (ignored); {r.get('other_years_unused', 0)} on other years "
                         "not used.")
    if thr:
        lines.append(f"- Threshold: {_fmt(thr.get('threshold'), 2)} on the calibrated probability ({thr.get('rule', '')}).")
    lines += ["- Temporal rule: an outline is kept only if one of an adjacent processed year overlaps it (as in "
              "Sepin, Vashold & Kuschnig 2025)" + (", but a confident outline of the first or last year without "
                                                   "one is kept as provisional" if provisional.any() else "")
              + "; countries: the one holding most of each outline.",
              "- Mine identities: an outline continues the mine it overlaps most in the previous year (gaps of up "
              "to `panel.max_gap` years kept); merges and splits are events.", "",
              "## Accuracy", ""]
    accuracy = _accuracy_lines(metrics) if metrics is not None else None
    if metrics_why or (metrics is not None and accuracy is None):
        why = metrics_why or "it holds no per-year accuracy in the form minemap writes"
        lines.append(f"**The accuracy could not be read** from `{metrics_path}` ({why}): this panel's accuracy is "
                     "not stated here. Run `minemap evaluate` (or the run with its reference) again to write it.")
    elif accuracy:
        lines += accuracy
    else:
        lines.append("No reference was given: the accuracy of this panel is not measured here; the model card's "
                     "test metrics above are on held-out chips of the training year.")
    lines += ["", "## Columns", ""]
    for table, cols in COLUMNS.items():
        order = {"panel": PANEL_COLUMNS, "mines": LINEAGE_COLUMNS, "events": EVENT_COLUMNS,
                 "changes": CHANGE_COLUMNS}[table]
        lines += [f"`{table}`:", "", "| column | unit and meaning |", "| --- | --- |"]
        lines += [f"| `{c}` | {cols[c]} |" for c in order]
        lines.append("")
    lines += ["## Licence", "",
              f"The polygons and tables: {licence}. The imagery they were mapped from keeps its own licence; check it "
              "before publishing derived maps.", "",
              "## How to cite", "",
              f"- This dataset: the authors of this run, *Mining areas panel {years[0] if years else ''}-"
              f"{years[-1] if years else ''}*, made with minemap {__version__}.",
              "- The method: Sepin, P., Vashold, L. & Kuschnig, N. Mapping mining areas in the tropics from 2016 to "
              "2024. Nature Sustainability (2025).", ""]
    return "\n".join(lines)


def _accuracy_lines(metrics: dict) -> list[str] | None:
    """The card's accuracy section from ``metrics.json`` (None: it holds no per-year accuracy in the form
    minemap writes, e.g. a hand-edited or foreign file)."""
    if not isinstance(metrics.get("years"), dict) or not metrics["years"]:
        return None
    lines: list[str] = []
    try:
        lines += [f"Against the reference polygons given to the run, pixel level, on {metrics.get('scope', 'every pixel')}; "
                  "reference pixels without an observation (no imagery, or masked as cloud or shadow) count as "
                  "missed unless an outline filled from the years beside covers them (found); 95 % intervals from "
                  "a bootstrap over 1 km blocks. 'All blocks' adds the blocks the model was trained and tuned on "
                  "(in-sample, for comparison only).", "",
                  "| year | precision | recall | F1 | reference unobserved | F1 all blocks (in-sample) | "
                  "calibration ECE / MCE |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for y, m in sorted(metrics["years"].items()):
            px = m.get("pixel", {})
            ci = px.get("ci95", {}).get("f1")
            f1 = _fmt(px.get("f1")) + (f" ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci else "")
            unseen = m.get("unobserved", {}).get("reference_share")
            found = m.get("unobserved", {}).get("found_share")
            every = m.get("all_blocks", {}).get("pixel", {}).get("f1")
            cal = m.get("calibration", {})
            lines.append(f"| {y} | {_fmt(px.get('precision'))} | {_fmt(px.get('recall'))} | {f1} | "
                         f"{'' if unseen is None else f'{unseen:.1%}'}"
                         f"{f' (found {found:.0%})' if unseen and found else ''} | "
                         f"{_fmt(every) if every is not None else ''} | "
                         f"{_fmt(cal.get('ece'))} / {_fmt(cal.get('mce'))} |")
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:  # a value not of minemap's form
        log.warning("metrics.json: not in the form minemap writes (%s: %s)", type(e).__name__, e)
        return None
    return lines
