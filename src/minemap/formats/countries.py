"""Country layers: the embedded Natural Earth layers, or a user's file with a code and a name column.

The default is Natural Earth 1:10m admin-0 (the study's scale; ``data/countries_ne10m.json`` records its source,
version, licence and conversion by ``tools/make_countries.py``). The 1:110m layer (40 x fewer vertices, borders
tens of kilometres off in places) stays for quick looks and for the tests that show what it gets wrong."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from minemap.errors import InputError
from minemap.formats.vectors import read_vector
from minemap.geo import WGS84, cut_at_antimeridian


_ISO_COLUMNS = ("iso3", "ISO3", "ISO_A3", "iso_a3", "ISO3_CODE", "GID_0", "shapeGroup", "ADM0_A3", "adm0_a3")


_NAME_COLUMNS = ("country", "COUNTRY", "NAME", "name", "NAME_0", "ADMIN", "COUNTRY_NAME", "shapeName", "NAME_EN")


EMBEDDED = {"10m": "countries_ne10m.parquet", "110m": "countries_ne110m.parquet"}
_LOADED: dict[str, gpd.GeoDataFrame] = {}


def load_countries(path: Path | None = None, scale: str = "10m") -> gpd.GeoDataFrame:
    """Country polygons (EPSG:4326, columns iso3, country): ``path``, or the embedded Natural Earth layer of
    ``scale`` (``10m``, the default, or ``110m``; read once per process, a copy returned). Outlines of a file
    whose rings jump across the antimeridian (web-map GeoJSON and TopoJSON) are cut there
    (:func:`minemap.geo.cut_at_antimeridian`): taken as they are, they would hold a band round the globe."""
    if path is None:
        if scale not in EMBEDDED:
            raise ValueError(f"no embedded country layer at scale {scale!r}: choose {', '.join(EMBEDDED)}")
        if scale not in _LOADED:
            with resources.as_file(resources.files("minemap") / "data" / EMBEDDED[scale]) as p:
                _LOADED[scale] = gpd.read_parquet(p)
        return _LOADED[scale].copy()
    gdf = read_vector(path)
    iso = next((c for c in _ISO_COLUMNS if c in gdf.columns), None)
    name = next((c for c in _NAME_COLUMNS if c in gdf.columns), None)
    if iso is None or name is None:
        raise InputError(f"{path}: no country code or name column (looked for {', '.join(_ISO_COLUMNS[:4])}, ... "
                         f"and {', '.join(_NAME_COLUMNS[:4])}, ...)")
    out = gpd.GeoDataFrame({"iso3": gdf[iso].astype(str), "country": gdf[name].astype(str)},
                           geometry=shapely.make_valid(cut_at_antimeridian(np.asarray(gdf.to_crs(WGS84).geometry.values))),
                           crs=WGS84)
    if "ADM0_A3" in gdf.columns and iso != "ADM0_A3":  # Natural Earth's -99 (France, Norway, ...)
        bad = out["iso3"] == "-99"
        out.loc[bad, "iso3"] = gdf.loc[bad, "ADM0_A3"].astype(str)
    return out
