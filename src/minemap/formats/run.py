"""The run folder's layout: which file lives where (``minemap run``, and the stages, report, review and export
that read a run)::

    OUT/labels.parquet            cleaned labels
    OUT/chips/                    training chips (see minemap.formats.chips)
    OUT/model_initial/            the first fit (with hard negatives on)
    OUT/hard_negatives/           the training year mapped by the first fit, and chips where it fired away
                                  from the labels (probabilities/, chips/)
    OUT/model/                    weights.safetensors, model.json (+ train_state.pt): the model used
    OUT/probabilities/<year>/     probability COGs per tile (+ manifest.jsonl of finished tiles); imagery.json
                                  (the source and bands mapped), tiles.json (tiles per year)
    OUT/threshold.json            the threshold vectorised with: best F1 on the training year's validation blocks
    OUT/polygons/<year>.parquet   vectorised polygons
    OUT/postprocessed.parquet     temporal rule, countries, areas
    OUT/panel.parquet, summary.csv, mines.*, events.*, changes.*  (see minemap.formats.panel)
    OUT/panel.gpkg, panel.fgb, panel.csv, study/, DATASET.md      exports (see minemap.export)
    OUT/metrics.json              with a reference
    OUT/report.html               the report
    OUT/review/                   review sheets per year, and verdicts.parquet
    OUT/manifest.jsonl            finished stages and the fingerprint of what they were made from
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minemap.formats.panel import PANEL_FILES

WEIGHTS = "weights.safetensors"  # a model folder's weights
CARD = "model.json"  # a model folder's card
STATE = "train_state.pt"  # a model folder's training state, while training
MANIFEST = "manifest.jsonl"
IMAGERY_RECORD = "imagery.json"  # in a probabilities folder: the source and bands it was mapped from
TILES_RECORD = "tiles.json"  # in a probabilities folder: tiles per year
REPORT = "report.html"
VERDICT_FILE = "verdicts.parquet"


@dataclass(frozen=True)
class RunFolder:
    """The paths of a run folder ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def labels(self) -> Path:
        return self.root / "labels.parquet"

    @property
    def chips(self) -> Path:
        return self.root / "chips"

    @property
    def model_initial(self) -> Path:
        return self.root / "model_initial"

    @property
    def hard_negatives(self) -> Path:
        return self.root / "hard_negatives"

    @property
    def hard_negative_chips(self) -> Path:
        return self.hard_negatives / "chips"

    @property
    def hard_negative_probabilities(self) -> Path:
        return self.hard_negatives / "probabilities"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def card(self) -> Path:
        return self.model / CARD

    @property
    def probabilities(self) -> Path:
        return self.root / "probabilities"

    @property
    def imagery_record(self) -> Path:
        return self.probabilities / IMAGERY_RECORD

    @property
    def threshold(self) -> Path:
        return self.root / "threshold.json"

    @property
    def polygons(self) -> Path:
        return self.root / "polygons"

    @property
    def postprocessed(self) -> Path:
        return self.root / "postprocessed.parquet"

    @property
    def panel_files(self) -> dict[str, Path]:
        return {k: self.root / v for k, v in PANEL_FILES.items()}

    @property
    def panel(self) -> Path:
        return self.root / PANEL_FILES["parquet"]

    @property
    def changes(self) -> Path:
        return self.root / PANEL_FILES["changes"]

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def review(self) -> Path:
        return self.root / "review"

    @property
    def verdicts(self) -> Path:
        return self.review / VERDICT_FILE
