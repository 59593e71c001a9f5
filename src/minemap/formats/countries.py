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
# the grid of cells one country alone holds (minemap.postprocess.inland_cells), over the globe, for a layer,
# computed once by tools/make_countries.py: rasterising 1:10m borders over the tropics takes seconds a run
INLAND_GRIDS = {"10m": "countries_ne10m_inland.npz"}
_LOADED: dict[str, gpd.GeoDataFrame] = {}
_GRIDS: dict[str, dict] = {}


def layer_fingerprint(countries: gpd.GeoDataFrame) -> str:
    """A digest of a country layer's rows: codes, and every vertex of each outline in order. Equal digests: the
    same layer, row for row (an inland grid's country indices hold for it)."""
    import hashlib

    geoms = np.asarray(countries.geometry.values)
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, countries["iso3"])).encode())
    h.update(shapely.get_num_coordinates(geoms).astype(np.int64).tobytes())
    h.update(np.ascontiguousarray(shapely.get_coordinates(geoms), np.float64).tobytes())
    return h.hexdigest()


def stored_inland_grid(countries: gpd.GeoDataFrame, cell: float) -> tuple[np.ndarray, float, float] | None:
    """The inland grid stored for an embedded layer (``INLAND_GRIDS``; the grid, int16 and read-only, and its
    top-left corner x0, y0), where ``countries`` is that layer row for row and the grid's cell is ``cell``; None
    otherwise (a user's layer, a subset or reordering of the embedded one: the caller computes the grid)."""
    for scale, name in INLAND_GRIDS.items():
        if scale not in _GRIDS:
            with resources.as_file(resources.files("minemap") / "data" / name) as p:
                if not p.is_file():
                    _GRIDS[scale] = {}
                    continue
                with np.load(p) as z:
                    _GRIDS[scale] = {k: z[k] for k in z.files}
                _GRIDS[scale]["grid"].setflags(write=False)  # shared by every call: read, never copied
        stored = _GRIDS[scale]
        if stored and len(countries) == int(stored["countries"]) and float(stored["cell"]) == cell \
                and layer_fingerprint(countries) == str(stored["fingerprint"]):
            return stored["grid"], float(stored["x0"]), float(stored["y0"])
    return None


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
