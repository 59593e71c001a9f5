"""Labels: read, validate, repair, merge and deduplicate polygons of known mining areas.

Reads one or several GeoPackage, GeoJSON, Shapefile or GeoParquet files; writes one clean GeoParquet
(EPSG:4326, columns ``label_id, source, source_id, geometry``), every geometry a valid, non-empty Polygon.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from minemap._io import atomic_path
from minemap.errors import InputError
from minemap.geo import WGS84

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".parquet", ".geoparquet", ".fgb"}
DUPLICATE_IOU = 0.9


@dataclass
class LabelReport:
    """What cleaning did, by count."""

    read: dict[str, int] = field(default_factory=dict)
    dropped_non_polygon: int = 0
    dropped_empty: int = 0
    repaired_invalid: int = 0
    parts_from_multipolygons: int = 0
    dropped_duplicates: int = 0
    dropped_outside_latitude: int = 0
    kept: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


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


def _polygon_parts(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explode to single polygons; returns (parts, index of the input each part came from)."""
    parts, idx = shapely.get_parts(geoms, return_index=True)
    # GeometryCollections from make_valid can nest; a second pass flattens them
    nested = shapely.get_type_id(parts) == shapely.GeometryType.GEOMETRYCOLLECTION
    if nested.any():
        sub, sub_idx = shapely.get_parts(parts[nested], return_index=True)
        parts = np.concatenate([parts[~nested], sub])
        idx = np.concatenate([idx[~nested], idx[nested][sub_idx]])
    keep = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    return parts[keep], idx[keep]


def clean_labels(gdf: gpd.GeoDataFrame, report: LabelReport | None = None) -> gpd.GeoDataFrame:
    """Repair and explode one source's geometries to valid single Polygons in EPSG:4326."""
    report = report if report is not None else LabelReport()
    gdf = gdf.to_crs(WGS84)
    geoms = np.asarray(gdf.geometry.values)
    missing = pd.isna(geoms) | shapely.is_empty(geoms)
    report.dropped_empty += int(missing.sum())
    types = shapely.get_type_id(geoms)
    polygonal = np.isin(types, [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON,
                                shapely.GeometryType.GEOMETRYCOLLECTION]) & ~missing
    report.dropped_non_polygon += int((~polygonal & ~missing).sum())
    src_rows = np.flatnonzero(polygonal)
    geoms = geoms[src_rows]
    invalid = ~shapely.is_valid(geoms)
    report.repaired_invalid += int(invalid.sum())
    geoms = geoms.copy()
    geoms[invalid] = shapely.make_valid(geoms[invalid])
    parts, idx = _polygon_parts(geoms)
    report.parts_from_multipolygons += int(len(parts) - len(np.unique(idx)))
    nonempty = ~shapely.is_empty(parts) & (shapely.area(parts) > 0)
    report.dropped_empty += int((~nonempty).sum())
    parts, idx = parts[nonempty], idx[nonempty]
    out = gdf.iloc[src_rows[idx]].drop(columns=gdf.geometry.name).reset_index(drop=True)
    return gpd.GeoDataFrame(out, geometry=parts, crs=WGS84)


def drop_duplicates(gdf: gpd.GeoDataFrame, iou: float = DUPLICATE_IOU) -> tuple[gpd.GeoDataFrame, int]:
    """Drop polygons that repeat an earlier one: the same shape, or an overlap of IoU >= ``iou``."""
    geoms = gdf.geometry.values
    key = shapely.to_wkb(shapely.normalize(shapely.set_precision(np.asarray(geoms), 1e-9)))
    exact_dup = pd.Series(key).duplicated().to_numpy()
    tree = shapely.STRtree(np.asarray(geoms))
    a, b = tree.query(np.asarray(geoms), predicate="intersects")
    later = b > a
    a, b = a[later], b[later]
    ga, gb = np.asarray(geoms)[a], np.asarray(geoms)[b]
    inter = shapely.area(shapely.intersection(ga, gb))
    union = shapely.area(ga) + shapely.area(gb) - inter
    near = inter / np.where(union > 0, union, 1) >= iou
    drop = exact_dup.copy()
    drop[b[near]] = True
    return gdf.loc[~drop].reset_index(drop=True), int(drop.sum())


def read_labels(paths: list[Path] | Path, max_abs_lat: float | None = None) -> tuple[gpd.GeoDataFrame, LabelReport]:
    """Read, clean, merge and deduplicate label files into one GeoDataFrame (EPSG:4326)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise InputError("no label files given")
    report = LabelReport()
    frames = []
    for path in paths:
        raw = read_vector(path)
        report.read[str(path)] = len(raw)
        id_col = next((c for c in ("id", "ID", "fid", "label_id") if c in raw.columns), None)
        raw = raw.assign(source=Path(path).stem,
                         source_id=(raw[id_col] if id_col else pd.Series(range(len(raw)), index=raw.index)).astype(str))
        cleaned = clean_labels(raw[["source", "source_id", raw.geometry.name]], report)
        if len(cleaned) == 0:
            raise InputError(f"{path}: has no polygons (only {', '.join(sorted(set(raw.geom_type.dropna())))})")
        frames.append(cleaned)
    gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=WGS84)
    gdf, report.dropped_duplicates = drop_duplicates(gdf)
    if max_abs_lat is not None:
        lat = shapely.get_y(shapely.centroid(gdf.geometry.values))
        inside = np.abs(lat) <= max_abs_lat
        report.dropped_outside_latitude = int((~inside).sum())
        gdf = gdf.loc[inside].reset_index(drop=True)
    gdf.insert(0, "label_id", np.arange(len(gdf), dtype=np.int64))
    report.kept = len(gdf)
    log.info("labels: %s", report.as_dict())
    return gdf, report


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


def labels_stage(paths: list[Path], dest: Path, max_abs_lat: float | None = None) -> LabelReport:
    """Stage ``labels``: clean label files into one GeoParquet at ``dest``."""
    gdf, report = read_labels(paths, max_abs_lat=max_abs_lat)
    write_geoparquet(gdf, dest)
    return report
