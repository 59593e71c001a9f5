"""Vector files: any format GDAL reads, in (one-line errors for a bad file); GeoParquet in and out, in row
groups for large frames."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely

from minemap._io import atomic_path
from minemap.errors import InputError


VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".parquet", ".geoparquet", ".fgb"}


def read_vector(path: Path | str) -> gpd.GeoDataFrame:
    """Read a vector file into a GeoDataFrame, with one-line errors for missing, unreadable or empty files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a vector file")
    if path.suffix.lower() not in VECTOR_SUFFIXES:
        raise InputError(f"{path}: unsupported vector format (use {', '.join(sorted(VECTOR_SUFFIXES))})")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        if path.suffix.lower() in {".parquet", ".geoparquet"}:
            gdf = read_geoparquet(path)
        else:
            gdf = gpd.read_file(path)
    except Exception as e:  # pyogrio, pyarrow and geopandas raise many types for a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable vector file ({msg})") from None
    if len(gdf) == 0:
        raise InputError(f"{path}: contains no features")
    if gdf.crs is None:
        raise InputError(f"{path}: has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326) and retry")
    return gdf


PARQUET_CHUNK_ROWS = 200_000


def write_geoparquet(gdf: gpd.GeoDataFrame, dest: Path) -> Path:
    """Write a GeoDataFrame as GeoParquet atomically. Snappy, not zstd: polygon coordinates barely compress
    (zstd's files are ~7 % smaller), and snappy reads and writes them markedly faster. Large frames (with a
    default index) go in row groups of :data:`PARQUET_CHUNK_ROWS`, each encoded on its own, so that the
    encoded copy of a million polygons never sits in memory whole (a GB at the published panel's scale)."""
    with atomic_path(Path(dest)) as tmp:
        default_index = isinstance(gdf.index, pd.RangeIndex) and gdf.index.start == 0 and gdf.index.step == 1
        if len(gdf) <= PARQUET_CHUNK_ROWS or not default_index:
            gdf.to_parquet(tmp, compression="snappy")
        else:
            _write_in_row_groups(gdf, tmp)
    return Path(dest)


def read_geoparquet(path: Path) -> gpd.GeoDataFrame:
    """``geopandas.read_parquet``, in batches of :data:`PARQUET_CHUNK_ROWS` rows where the file is larger (WKB
    geometry): the file's encoded form is then never in memory whole beside the decoded polygons (reading a
    million polygons at once peaks at about twice what they hold once read). The next batch is read and
    decompressed in a thread while this one's polygons are decoded."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    geo = json.loads(meta[b"geo"]) if b"geo" in meta else None
    col = geo and geo.get("primary_column")
    column = geo["columns"].get(col, {}) if geo else {}
    stored_index = any(isinstance(i, str) for i in json.loads(meta.get(b"pandas", b"{}")).get("index_columns", []))
    if pf.metadata.num_rows <= PARQUET_CHUNK_ROWS or not geo or column.get("encoding", "WKB").upper() != "WKB" \
            or len(geo["columns"]) != 1 or stored_index:
        return gpd.read_parquet(path)
    crs = column.get("crs", "OGC:CRS84")  # GeoParquet: no crs means longitude/latitude on WGS84
    frames = []
    for batch in _one_ahead(pf.iter_batches(batch_size=PARQUET_CHUNK_ROWS)):
        table = pa.Table.from_batches([batch])
        geoms = shapely.from_wkb(table.column(col).to_numpy(zero_copy_only=False))
        frames.append(gpd.GeoDataFrame(table.drop_columns([col]).to_pandas(), geometry=geoms, crs=crs))
        del table, batch
    out = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(out[[c for c in pf.schema_arrow.names if c in out.columns]], geometry=col, crs=crs)


def _one_ahead(items):
    """The items of an iterator, the next one produced in a thread while the caller works on this one (for
    reading and decompressing, which release the GIL, beside decoding, which holds it)."""
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    done = object()
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, items, done)
        while (item := ahead.result()) is not done:
            ahead = pool.submit(next, items, done)
            yield item


def _write_in_row_groups(gdf: gpd.GeoDataFrame, path: Path) -> None:
    """GeoParquet written chunk by chunk: geopandas' own schema and "geo" metadata (from one row), with the
    attribute types and the bounding box and geometry types of the whole frame. Each chunk is compressed and
    written in a thread while the next one is encoded."""
    import io
    import json
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    col = gdf.geometry.name
    buf = io.BytesIO()
    gdf.iloc[:1].to_parquet(buf, compression="snappy", index=False)
    template = pq.read_schema(pa.BufferReader(buf.getvalue()))
    geo = json.loads(template.metadata[b"geo"])
    geo["columns"][col]["bbox"] = [float(v) for v in gdf.total_bounds]
    geo["columns"][col]["geometry_types"] = sorted(map(str, gdf.geom_type.dropna().unique()))
    attributes = pa.Schema.from_pandas(pd.DataFrame(gdf.drop(columns=col)), preserve_index=False)
    fields = [attributes.field(f.name) if f.name != col else f for f in template]
    schema = pa.schema(fields, metadata={**template.metadata, b"geo": json.dumps(geo).encode()})
    with pq.ParquetWriter(path, schema, compression="snappy") as writer, ThreadPoolExecutor(1) as pool:
        written = None
        for i in range(0, len(gdf), PARQUET_CHUNK_ROWS):
            part = pa.table(gdf.iloc[i:i + PARQUET_CHUNK_ROWS].to_arrow(index=False, geometry_encoding="WKB"))
            part = part.cast(schema)
            if written is not None:
                written.result()
            written = pool.submit(writer.write_table, part)
            del part
        if written is not None:
            written.result()
