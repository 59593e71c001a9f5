"""Report: one self-contained HTML page of a run, to look at before trusting its numbers.

``report.html`` holds PNG plots (km2 a year by country; new, expanded, shrunk and abandoned area; per-year
metrics with their 95 % intervals; precision-recall and reliability curves; image / probability / polygons side
by side for the largest mines, :data:`minemap.views.SAMPLE_TILES` places drawn at random from the last year's tiles and, where a
reference exists, the largest errors) and an interactive map
(Leaflet through folium): the mines coloured by year, one layer a year in a layer control, popups with mine_id,
area, country, first year and mean probability, and the probability raster of one year as an overlay where it
is small enough (:data:`minemap.views.MAX_OVERLAY_PIXELS`).

Self-contained: it opens with no network. Leaflet's JavaScript and CSS are inlined from the installed
``xstatic-leaflet`` package, folium's other CDN assets (jQuery, Bootstrap, icon fonts) are left out, there is no
basemap (tiles come from servers), and the plots are inlined PNGs.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from tqdm.auto import tqdm

from minemap._io import atomic_path, read_json
from minemap.errors import InputError
from minemap.evaluate import read_reference
from minemap.formats.panel import read_panel
from minemap.formats.run import RunFolder
from minemap.panel import change_statistics
from minemap.views import Rasters, _figure, _plt, _png, plot_views

log = logging.getLogger(__name__)
REPORT_FORMAT = 1  # bumped when the report changes, so that a resumed run writes it again
MAX_MAP_POLYGONS = 10_000  # on the map, all years together; each year shows its largest where it has more
MAP_GRID_DEG = 1e-6  # coordinates on the map rounded to ~0.1 m: half the page's size, nothing visible lost
SIMPLIFY_DEG = 0.00002  # ~2 m: outlines on the map lose vertices no one can see
COLOURS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725", "#e76f51", "#9d4edd", "#f4a261", "#2a9d8f"]



def plot_area(changes: pd.DataFrame, top: int = 8) -> str:
    """km2 of mining a year, one line per country (the largest ``top``; the rest summed as 'other')."""
    by = changes.groupby(["country", "year"]).area_km2.sum().unstack(0).fillna(0.0)
    order = by.sum().sort_values(ascending=False).index
    shown = by[order[:top]]
    if len(order) > top:
        shown = shown.assign(other=by[order[top:]].sum(1))
    fig, ax = _figure()
    for i, col in enumerate(shown.columns):
        colour = "#888888" if col == "other" and i == len(shown.columns) - 1 else COLOURS[i % len(COLOURS)]
        ax.plot(shown.index, shown[col], marker="o", color=colour, label=col)
    ax.set(xlabel="year", ylabel="km²", title="Mining area by country")
    ax.set_xticks(list(shown.index))
    ax.legend(fontsize=8)
    return _png(fig)


def plot_change(changes: pd.DataFrame) -> str:
    """New and expanded area (up) against shrunk and abandoned area (down) a year, all countries."""
    per = changes.groupby("year")[["new_km2", "expanded_km2", "shrunk_km2", "abandoned_km2"]].sum(min_count=1)
    per = per.dropna(how="all")
    fig, ax = _figure()
    x = per.index.to_numpy()
    ax.bar(x, per.new_km2, color="#e76f51", label="new")
    ax.bar(x, per.expanded_km2, bottom=per.new_km2, color="#f4a261", label="expanded")
    ax.bar(x, -per.abandoned_km2, color="#21918c", label="abandoned")
    ax.bar(x, -per.shrunk_km2, bottom=-per.abandoned_km2, color="#5ec962", label="shrunk")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="year", ylabel="km² since the year before", title="New versus abandoned mining area")
    ax.set_xticks(list(x))
    ax.legend(fontsize=8)
    return _png(fig)


def plot_metrics(metrics: dict) -> str:
    """Pixel precision, recall and F1 a year with their 95 % intervals (bootstrap over spatial blocks)."""
    years = sorted(metrics["years"])
    fig, ax = _figure()
    for k, (name, colour) in enumerate((("precision", "#3b528b"), ("recall", "#21918c"), ("f1", "#e76f51"))):
        vals = np.array([metrics["years"][y]["pixel"][name] for y in years])
        ci = [metrics["years"][y]["pixel"].get("ci95", {}).get(name) for y in years]
        lo = np.array([v - c[0] if c else 0.0 for v, c in zip(vals, ci)])
        hi = np.array([c[1] - v if c else 0.0 for v, c in zip(vals, ci)])
        x = np.arange(len(years)) + (k - 1) * 0.2
        ax.errorbar(x, vals, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="o", capsize=3, color=colour,
                    label=name)
    ax.set_xticks(np.arange(len(years)), years)
    ax.set(ylim=(0, 1.02), xlabel="year", ylabel="pixel metric", title="Accuracy against the reference (95 % intervals)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_curves(metrics: dict) -> str:
    """Precision-recall of the raw probabilities (threshold sweep) and reliability, a line per year."""
    fig, (pr, rel) = _plt().subplots(1, 2, figsize=(9, 3.6))
    for i, (year, m) in enumerate(sorted(metrics["years"].items())):
        colour = COLOURS[i % len(COLOURS)]
        rows = m.get("raw_probability", {}).get("threshold_sweep", [])
        pr.plot([r["recall"] for r in rows], [r["precision"] for r in rows], marker=".", color=colour, label=year)
        table = m.get("calibration", {}).get("table", [])
        rel.plot([r["mean_probability"] for r in table], [r["observed"] for r in table], marker="o", color=colour,
                 label=f"{year} (ECE {m.get('calibration', {}).get('ece', float('nan')):.3f})")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="Precision-recall")
    rel.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    rel.set(xlabel="predicted probability", ylabel="observed share of mining", xlim=(0, 1), ylim=(0, 1),
            title="Reliability")
    pr.legend(fontsize=8)
    rel.legend(fontsize=8)
    return _png(fig)



def largest_errors(panel: gpd.GeoDataFrame, reference: gpd.GeoDataFrame, n: int = 3) -> list[tuple[str, int, shapely.Geometry]]:
    """The ``n`` largest disagreements between the mines and the reference over all years: parts of one not
    covered by the other (false alarms and misses), largest first."""
    out = []
    for year in sorted(set(panel.year) & set(reference.year)):
        mines = shapely.union_all(np.asarray(panel[panel.year == year].geometry.values))
        ref = shapely.union_all(np.asarray(reference[reference.year == year].geometry.values))
        for kind, part in (("false alarm", shapely.difference(mines, ref)), ("missed", shapely.difference(ref, mines))):
            for g in getattr(part, "geoms", [part]):
                if not g.is_empty and g.area > 0:
                    out.append((g.area, kind, int(year), g))
    out.sort(key=lambda t: -t[0])
    return [(kind, year, g) for _, kind, year, g in out[:n]]


def _leaflet_assets() -> tuple[str, str]:
    """Leaflet's JavaScript and CSS from the installed xstatic-leaflet package."""
    try:
        from xstatic.pkg import leaflet
    except ImportError:
        raise InputError("the report needs the xstatic-leaflet package (Leaflet's JavaScript and CSS, inlined so "
                         "that the page works offline): pip install xstatic-leaflet") from None
    base = Path(leaflet.BASE_DIR)
    css = (base / "leaflet.css").read_text(encoding="utf-8")

    def inline(m: re.Match) -> str:  # the style sheet's icons, as data: a file:// page has no images/ beside it
        f = base / m.group(1)
        return f"url(data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()})" if f.is_file() else "none"

    css = re.sub(r"url\(\s*['\"]?(images/[\w.-]+\.png)['\"]?\s*\)", inline, css)
    return (base / "leaflet.js").read_text(encoding="utf-8"), css


# A popup of a mine's record whose values are set as text (``textContent``), never parsed as HTML: folium's own
# GeoJsonPopup joins the values into a string given to ``innerHTML``, so that a country name from a user's
# countries file (``<img src=x onerror=...>``) would run as script in the page. Numbers are shown as they are
# (rounded before), not localised ("2,019" for a year).
_POPUP_JS = """
    {% macro script(this, kwargs) %}
    {{ this._parent.get_name() }}.bindPopup(function(layer) {
        let div = L.DomUtil.create('div');
        let table = L.DomUtil.create('table', '', div);
        let fields = {{ this.fields | tojson }};
        let aliases = {{ this.aliases | tojson }};
        fields.forEach(function(field, i) {
            let row = L.DomUtil.create('tr', '', table);
            L.DomUtil.create('th', '', row).textContent = aliases[i];
            let v = layer.feature.properties[field];
            L.DomUtil.create('td', '', row).textContent = (v === null || v === undefined) ? '' :
                (typeof v === 'object' ? JSON.stringify(v) : String(v));
        });
        return div;
    }, {{ this.popup_options | tojavascript }});
    {% endmacro %}
"""


def _text_popup(fields: list[str], aliases: list[str]):
    """A folium popup of ``fields`` (shown as ``aliases``) whose values are text, never HTML; see _POPUP_JS."""
    import folium
    from folium.template import Template

    class TextPopup(folium.GeoJsonPopup):
        _template = Template(_POPUP_JS)

    return TextPopup(fields=fields, aliases=aliases, localize=False)


def build_map(panel: gpd.GeoDataFrame, overlay: tuple[int, np.ndarray, list] | None = None):
    """A folium map with no network needs: one layer of mines a year (the last shown), popups, an optional
    probability overlay (year, RGBA, bounds), a layer control."""
    import folium
    from branca.element import Element

    class OfflineMap(folium.Map):  # no CDN links: Leaflet is inlined below, nothing else is needed
        default_js: list = []
        default_css: list = []

    west, south, east, north = panel.total_bounds
    fmap = OfflineMap(location=[(south + north) / 2, (west + east) / 2], tiles=None, zoom_start=12,
                      width="100%", height="560px", control_scale=True)
    fmap.fit_bounds([[south, west], [north, east]])
    js, css = _leaflet_assets()
    root = fmap.get_root()
    root.header.add_child(Element(f"<style>{css}</style>"), name="leaflet_css")
    root.header.add_child(Element(f"<script>{js}</script>"), name="leaflet_js")
    years = sorted(panel.year.unique())
    per_year = max(1, MAX_MAP_POLYGONS // len(years))
    for i, year in enumerate(years):
        gdf = panel[panel.year == year]
        if len(gdf) > per_year:
            gdf = gdf.nlargest(per_year, "area_km2")
        gdf = gdf[["mine_id", "year", "country", "first_year", "area_km2", "mean_probability", "geometry"]].copy()
        gdf["geometry"] = shapely.set_precision(shapely.simplify(np.asarray(gdf.geometry.values), SIMPLIFY_DEG),
                                                MAP_GRID_DEG)
        gdf["area_km2"] = gdf.area_km2.round(4)
        gdf["mean_probability"] = gdf.mean_probability.round(3)
        gdf["country"] = gdf.country.fillna("(none)")
        colour = COLOURS[i % len(COLOURS)]
        # layer names are HTML to Leaflet's layer control: a number, never text from the data
        layer = folium.FeatureGroup(name=f"mines {int(year)}", show=bool(year == years[-1]))
        folium.GeoJson(
            gdf.to_json(drop_id=True, to_wgs84=True), name=f"mines {int(year)}",
            style_function=lambda _f, c=colour: {"color": c, "weight": 2, "fillColor": c, "fillOpacity": 0.35},
            popup=_text_popup(["mine_id", "year", "area_km2", "country", "first_year", "mean_probability"],
                              ["mine", "year", "km²", "country", "first year", "mean probability"]),
        ).add_to(layer)
        layer.add_to(fmap)
    if overlay is not None:
        year, rgba, bounds = overlay
        folium.raster_layers.ImageOverlay(rgba, bounds=bounds, name=f"probability {int(year)}", opacity=0.8,
                                          show=False).add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    return fmap


def _table(df: pd.DataFrame, floats: int = 3) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.{floats}f}", border=0, classes="t", na_rep="",
                      escape=True)  # values from files are text, not HTML


def report(run_dir: Path, dest: Path | None = None, reference: Path | None = None, progress: bool = True) -> Path:
    """Write ``report.html`` (default in ``run_dir``) for the run at ``run_dir``; ``reference``: polygons to
    show the largest errors against (default: none, the metrics of ``metrics.json`` are shown either way)."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    dest = Path(dest) if dest else folder.report
    panel = read_panel(run_dir)
    if len(panel) == 0 or panel.year.nunique() == 0:
        raise InputError(f"{folder.panel}: the panel holds no years: nothing to report")
    ref = None
    if reference is not None:
        ref = read_reference(Path(reference))
    steps = tqdm(total=6, desc="report", unit="part", disable=not progress, leave=False)
    changes_path = folder.changes
    changes = pd.read_parquet(changes_path) if changes_path.is_file() else change_statistics(panel)
    changes["country"] = changes["country"].fillna("(none)")
    metrics = read_json(folder.metrics)[0] or {}
    card = read_json(folder.card)[0] or {}
    threshold = read_json(folder.threshold)[0] or {}
    years = sorted(int(y) for y in panel.year.unique())
    sections = []
    summary = panel.groupby("year").agg(mines=("mine_id", "nunique"), km2=("area_km2", "sum")).reset_index()
    sections.append(("Mines a year", _table(summary)))
    steps.update()
    sections.append(("Mining area by country", f'<img alt="area by country" src="{plot_area(changes)}">'))
    if changes[["new_km2", "abandoned_km2"]].notna().any().any():
        sections.append(("New versus abandoned", f'<img alt="new versus abandoned" src="{plot_change(changes)}">'))
    steps.update()
    if metrics.get("years"):
        rows = [{"year": y, **{k: m["pixel"][k] for k in ("precision", "recall", "f1", "iou")},
                 "F1 95 % interval": "-".join(f"{v:.3f}" for v in m["pixel"].get("ci95", {}).get("f1", [])),
                 "object precision": m["object"]["precision"], "object recall": m["object"]["recall"],
                 "reference unobserved": f"{m.get('unobserved', {}).get('reference_share', 0):.1%}",
                 "of it found (filled)": f"{m.get('unobserved', {}).get('found_share', 0):.0%}",
                 **({"F1 all blocks (in-sample)": m["all_blocks"]["pixel"]["f1"]} if "all_blocks" in m else {}),
                 "calibration ECE / MCE": f"{m['calibration']['ece']:.3f} / {m['calibration'].get('mce', 0):.3f}"}
                for y, m in sorted(metrics["years"].items())]
        body = (f"<p>Headline: {html.escape(str(metrics.get('scope', 'every pixel')))}. Reference pixels without an "
                "observation (no imagery, or masked as cloud or shadow) count as missed unless an outline filled "
                "from the years beside covers them; the share of them, and of those found, is given per year. "
                "'All blocks' adds the blocks the model was trained and tuned on: in-sample, for comparison only.</p>")
        body += _table(pd.DataFrame(rows)) + f'<img alt="metrics" src="{plot_metrics(metrics)}">'
        body += f'<img alt="precision-recall and reliability" src="{plot_curves(metrics)}">'
        if metrics.get("by_country"):
            body += "<h3>By country</h3>" + _table(pd.DataFrame(
                [{"iso3": k, **{m: v[m] for m in ("precision", "recall", "f1")}, "blocks": v.get("blocks")}
                 for k, v in metrics["by_country"].items()]))
        sections.append(("Accuracy", body))
    else:
        sections.append(("Accuracy", "<p>No reference was given to this run: its accuracy is not measured here."
                                     + (f" The model's test F1 on held-out chips: "
                                        f"{card['test_metrics']['f1']:.3f}." if card.get("test_metrics") else "")
                                     + "</p>"))
    steps.update()
    rasters = Rasters(run_dir)
    cases = [(f"largest mine {int(r.year)}", int(r.year), r.geometry)
             for r in panel.nlargest(2, "area_km2").itertuples()]
    cases += [(f"sample tile {k + 1} of {years[-1]}", years[-1], p)
              for k, p in enumerate(rasters.sample_places(years[-1]))]
    if ref is not None:
        cases += largest_errors(panel, ref)
    views = plot_views(rasters, cases, panel, ref)
    if views:
        sections.append(("Look closer", f'<img alt="image, probability and polygons" src="{views}">'))
    steps.update()
    got = rasters.overlay(years[-1])
    fmap = build_map(panel, (years[-1], *got) if got is not None else None)
    steps.update()
    facts = [f"run: {html.escape(str(run_dir.resolve()))}", f"years: {years[0]}-{years[-1]}",
             f"mines: {panel.mine_id.nunique():,}", f"mine-years: {len(panel):,}"]
    if card:  # every value from a file is escaped: the page is HTML
        facts.append(f"model: {html.escape(str(card.get('encoder')))}, trained on "
                     f"{html.escape(str(card.get('train_year')))}, threshold {html.escape(str(card.get('threshold')))}")
    if threshold.get("threshold") is not None:
        facts.append(f"threshold used: {html.escape(str(threshold['threshold']))}")
    shown = int(np.minimum(panel.groupby("year").size(), max(1, MAX_MAP_POLYGONS // len(years))).sum())
    head = ("<h1>minemap report</h1><p>" + " &middot; ".join(facts) + '</p><p><a href="#the-map">The map</a> is at '
            "the end" + (f" (the largest mines of each year, {shown:,} of {len(panel):,} mine-years)"
                         if shown < len(panel) else "") + ".</p>")
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{b}</section>" for t, b in sections)
    # folium places the map's own element after everything added to the page, so the map closes it (its style
    # sheet pins any element with id "map" to the window: the heading has another id)
    body += ('<h2 id="the-map">Map</h2><p>No network needed, so no basemap: each year\'s mines are a layer (tick the '
             "years to show; click a mine for its record)"
             + (f", the probabilities of {years[-1]} another" if got is not None else "") + ".</p>")
    from branca.element import Element

    root = fmap.get_root()
    root.header.add_child(Element("<style>body{font-family:sans-serif;margin:1.5em !important;width:auto !important;max-width:1100px}"
                                  "img{max-width:100%;display:block;margin:.5em 0}table.t{border-collapse:collapse}"
                                  "table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}"
                                  ".folium-map{border:1px solid #aaa}</style>"), name="report_css")
    root.html.add_child(Element(head), name="report_head", index=0)
    root.html.add_child(Element(body), name="report_body")
    page = root.render()
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    steps.update()
    steps.close()
    return dest
