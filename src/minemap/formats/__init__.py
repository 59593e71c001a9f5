"""The ground floor: the files minemap reads and writes, each format in one place.

- :mod:`~minemap.formats.vectors`: vector files in (any format GDAL reads) and GeoParquet in and out;
- :mod:`~minemap.formats.rasters`: Cloud-Optimised GeoTIFFs and the probability raster's encoding;
- :mod:`~minemap.formats.chips`: a chips folder: its index, metadata, blocks table and possible missed mines;
- :mod:`~minemap.formats.panel`: the panel's columns, files and reader;
- :mod:`~minemap.formats.countries`: country layers (the embedded one, or a user's);
- :mod:`~minemap.formats.run`: the run folder's layout: which file lives where.

Modules here import nothing from minemap but :mod:`minemap._io`, :mod:`minemap.errors`, :mod:`minemap.geo`,
:mod:`minemap.lattice` and each other, so every stage, the report, review and export can use them.
"""
