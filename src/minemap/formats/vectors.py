"""Vector files: any format GDAL reads, in (one-line errors for a bad file); GeoParquet in and out, in row
groups for large frames; within :func:`reusing_wkb`, polygons written back as they were read are not encoded
again."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import geopandas as gpd
import numpy as np
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


class _ReadWkb:
    """The polygons GeoParquet reads gave within :func:`reusing_wkb`, with the WKB each was decoded from."""

    def __init__(self) -> None:
        self.geoms: list[np.ndarray] = []
        self.wkb: list = []  # pyarrow arrays, one per batch read, aligned with geoms
        self.lock = threading.Lock()
        self._index: tuple[int, np.ndarray, np.ndarray] | None = None  # (batches indexed, sorted ids, rows)

    def add(self, geoms: np.ndarray, wkb) -> None:
        with self.lock:
            self.geoms.append(geoms)
            self.wkb.append(wkb)

    def rows(self, geoms: np.ndarray) -> np.ndarray:
        """Per geometry, its row among those read (batches in order), or -1 where it was not read here. A
        geometry is found by identity: the registry holds every object it registered, so an object's id is
        never reused by another while it is registered, and a geometry changed since (repaired, clipped) is a
        new object."""
        with self.lock:
            if self._index is None or self._index[0] != len(self.geoms):
                ids = np.fromiter((id(g) for part in self.geoms for g in part), np.int64,
                                  sum(map(len, self.geoms)))
                order = np.argsort(ids, kind="stable")
                self._index = (len(self.geoms), ids[order], order)
            _, ids, order = self._index
        if len(ids) == 0:
            return np.full(len(geoms), -1, np.int64)
        want = np.fromiter(map(id, geoms), np.int64, len(geoms))
        at = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
        return np.where(ids[at] == want, order[at], -1)


_READ: _ReadWkb | None = None


@contextmanager
def reusing_wkb() -> Iterator[None]:
    """Within this block, GeoParquet files read keep the WKB of their polygons, and :func:`write_geoparquet`
    writes a polygon read here and unchanged since (the same shapely object: geometries are immutable) by copying
    its bytes instead of encoding it again: post-processing and the panel write back nearly every polygon they
    read, and encoding a million polygons takes seconds. Holds the WKB read (about the files' size) until the
    block ends."""
    global _READ
    outer, _READ = _READ, _READ or _ReadWkb()
    try:
        yield
    finally:
        _READ = outer


def _wkb_array(geoms: np.ndarray):
    """The ISO WKB of ``geoms`` as a pyarrow binary array: copied from what was read within
    :func:`reusing_wkb` where a geometry was, encoded where not."""
    import pyarrow as pa

    read = _READ
    rows = read.rows(geoms) if read is not None else np.full(len(geoms), -1, np.int64)
    fresh = np.flatnonzero(rows < 0)
    encoded = pa.array(shapely.to_wkb(geoms[fresh], flavor="iso"), pa.binary())
    if len(fresh) == len(geoms):
        return encoded
    # each batch read gives its rows (a take over all batches at once would first copy them all into one array),
    # then the pieces are put back in order
    starts = np.cumsum([0] + [len(w) for w in read.wkb])
    batch = np.searchsorted(starts, rows, side="right") - 1
    pieces, placed = [encoded], [fresh]
    for k in np.unique(batch[rows >= 0]):
        at = np.flatnonzero((batch == k) & (rows >= 0))
        pieces.append(read.wkb[k].take(pa.array(rows[at] - starts[k])))
        placed.append(at)
    where = np.empty(len(geoms), np.int64)
    where[np.concatenate(placed)] = np.arange(len(geoms))
    return pa.concat_arrays([p.cast(pa.binary()) for p in pieces]).take(pa.array(where))


def write_geoparquet(gdf: gpd.GeoDataFrame, dest: Path) -> Path:
    """Write a GeoDataFrame as GeoParquet atomically. Snappy, not zstd: polygon coordinates barely compress
    (zstd's files are ~7 % smaller), and snappy reads and writes them markedly faster. Large frames (with a
    default index) go in row groups of :data:`PARQUET_CHUNK_ROWS`, each encoded on its own, so that the
    encoded copy of a million polygons never sits in memory whole (a GB at the published panel's scale)."""
    with atomic_path(Path(dest)) as tmp:
        default_index = isinstance(gdf.index, pd.RangeIndex) and gdf.index.start == 0 and gdf.index.step == 1
        if (len(gdf) <= PARQUET_CHUNK_ROWS and _READ is None) or not default_index or len(gdf) == 0:
            gdf.to_parquet(tmp, compression="snappy")
        else:
            _write_in_row_groups(gdf, tmp)
    return Path(dest)


def read_geoparquet(path: Path) -> gpd.GeoDataFrame:
    """``geopandas.read_parquet``, in batches of :data:`PARQUET_CHUNK_ROWS` rows where the file is larger (WKB
    geometry): the file's encoded form is then never in memory whole beside the decoded polygons (reading a
    million polygons at once peaks at about twice what they hold once read). The next batch is read and
    decompressed in a thread while this one's polygons are decoded. Within :func:`reusing_wkb` every file is read
    so, and its polygons' WKB kept."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    geo = json.loads(meta[b"geo"]) if b"geo" in meta else None
    col = geo and geo.get("primary_column")
    column = geo["columns"].get(col, {}) if geo else {}
    stored_index = any(isinstance(i, str) for i in json.loads(meta.get(b"pandas", b"{}")).get("index_columns", []))
    read = _READ
    if (pf.metadata.num_rows <= PARQUET_CHUNK_ROWS and read is None) or not geo \
            or column.get("encoding", "WKB").upper() != "WKB" or len(geo["columns"]) != 1 or stored_index:
        return gpd.read_parquet(path)
    crs = column.get("crs", "OGC:CRS84")  # GeoParquet: no crs means longitude/latitude on WGS84
    frames = []
    for batch in _one_ahead(pf.iter_batches(batch_size=PARQUET_CHUNK_ROWS)):
        table = pa.Table.from_batches([batch])
        wkb = batch.column(batch.schema.get_field_index(col))
        geoms = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
        if read is not None:
            read.add(geoms, wkb)
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
    written in a thread while the next one is encoded (its polygons' WKB copied where :func:`reusing_wkb` holds
    it)."""
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
    values = pd.DataFrame(gdf.drop(columns=col))
    attributes = pa.Schema.from_pandas(values, preserve_index=False)
    fields = [attributes.field(f.name) if f.name != col else f for f in template]
    schema = pa.schema(fields, metadata={**template.metadata, b"geo": json.dumps(geo).encode()})
    geoms = np.asarray(gdf.geometry.values)
    with pq.ParquetWriter(path, schema, compression="snappy") as writer, ThreadPoolExecutor(1) as pool:
        written = None
        for i in range(0, len(gdf), PARQUET_CHUNK_ROWS):
            rows = slice(i, i + PARQUET_CHUNK_ROWS)
            table = pa.Table.from_pandas(values.iloc[rows], schema=attributes, preserve_index=False)
            wkb = _wkb_array(geoms[rows]).cast(schema.field(col).type)
            part = pa.Table.from_arrays([wkb if f.name == col else table.column(f.name) for f in schema],
                                        schema=schema)
            del table
            if written is not None:
                written.result()
            written = pool.submit(writer.write_table, part)
            del part
        if written is not None:
            written.result()
