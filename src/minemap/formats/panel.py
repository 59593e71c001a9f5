"""The panel's files (``minemap panel``): their names, columns and version, and the checked reader.

``panel.parquet`` (GeoParquet, EPSG:4326) holds a row per mine and year (:data:`PANEL_COLUMNS`); beside it
``summary.csv`` (per country and year), ``mines.*`` (a row per mine: :data:`LINEAGE_COLUMNS`), ``events.*``
(appearances, splits, merges: :data:`EVENT_COLUMNS`) and ``changes.*`` (area change per country and year:
:data:`CHANGE_COLUMNS`), each as Parquet and CSV.
"""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd

from minemap.errors import InputError


PANEL_COLUMNS = ["mine_id", "district_id", "year", "iso3", "country", "first_year", "area_km2", "mean_probability",
                 "provisional", "filled_share", "geometry"]


LATER_COLUMNS = {"filled_share": 0.0}  # panel columns added after the first release, and their value in older panels


LINEAGE_COLUMNS = ["mine_id", "district_id", "first_year", "last_year", "years_seen", "years", "max_area_km2",
                   "iso3", "country", "split_from"]


CHANGE_COLUMNS = ["iso3", "country", "year", "n_mines", "area_km2", "new_km2", "expanded_km2", "shrunk_km2",
                  "abandoned_km2"]


EVENT_COLUMNS = ["year", "kind", "mine_id", "parent_ids", "child_ids"]


EVENT_KINDS = ("appeared", "reappeared", "split", "merged", "disappeared")


PANEL_FORMAT = 4  # bumped when the panel's files change, so that a resumed run rebuilds them


PANEL_FILES = {"parquet": "panel.parquet", "summary": "summary.csv",
               "mines": "mines.parquet", "mines_csv": "mines.csv", "events": "events.parquet",
               "events_csv": "events.csv", "changes": "changes.parquet", "changes_csv": "changes.csv"}


def read_panel(path: Path) -> gpd.GeoDataFrame:
    """A panel written by ``minemap panel`` (or ``run``), checked: one line naming the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "panel.parquet"
    if not path.is_file():
        raise InputError(f"{path}: no panel here (run `minemap panel` or `minemap run` first)")
    try:
        panel = gpd.read_parquet(path)
    except Exception as e:  # not a GeoParquet file
        raise InputError(f"{path}: not a GeoParquet panel ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [c for c in PANEL_COLUMNS if c not in panel.columns and c not in LATER_COLUMNS]
    if missing:
        raise InputError(f"{path}: missing panel column(s) {', '.join(missing)}")
    for column, value in LATER_COLUMNS.items():  # a panel written before the column existed
        if column not in panel.columns:
            panel.insert(panel.columns.get_loc(PANEL_COLUMNS[PANEL_COLUMNS.index(column) - 1]) + 1, column, value)
    if panel.crs is None or panel.crs.to_epsg() != 4326:
        raise InputError(f"{path}: a panel is in EPSG:4326, not {panel.crs}")
    return panel


# the published dataset's files (Sepin et al. 2025), one a year: written by the ``study`` export, read by ``panel``
STUDY_NAME = "global_mining_polygons_predicted_{year}_postprocessed.gpkg"
STUDY_PATTERN = re.compile(r"global_mining_polygons_predicted_((?:19|20)\d{2})_postprocessed\.gpkg$")
