"""Models: build, save and load SegFormer segmentation models, and their model cards.

The network is Hugging Face transformers' ``SegformerForSemanticSegmentation`` built from a config (mit-b0 to
mit-b5 sizes, any number of input bands, one output logit: P(mining) = sigmoid(logit)); nothing is downloaded.

A model directory holds::

    weights.safetensors   the state dict
    model.json            the model card (:class:`ModelCard`): architecture, bands and order, per-band
                          normalisation, ground sample distance, chip size, threshold, training-data fingerprint,
                          validation and test metrics
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from minemap import __version__
from minemap._io import atomic_path
from minemap.errors import InputError, ModelError
from minemap.formats.run import CARD, WEIGHTS

log = logging.getLogger(__name__)

# Encoder sizes of the SegFormer paper (Xie et al. 2021), as in nvidia/mit-b0 .. mit-b5
ENCODERS: dict[str, dict] = {
    "mit-b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "mit-b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "mit-b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "mit-b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], decoder_hidden_size=768),
    "mit-b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], decoder_hidden_size=768),
    "mit-b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
}
FINE_CHANNELS = 8  # width of the full-resolution branch of the "fine" head
DOWNLOAD_HINT = (
    "minemap downloads nothing at run time: fetch the encoder once where you have network, e.g. "
    "`huggingface-cli download nvidia/mit-b0 --local-dir models/mit-b0` (or mit-b1..b5), "
    "and pass that directory (or its model.safetensors) as the pretrained checkpoint"
)


class ModelCard(BaseModel):
    """What a model is, what it expects, and how well it did. Stored as ``model.json``."""

    format_version: int = 1
    architecture: str = "segformer"
    encoder: str
    # mmseg: stage projections with a ReLU (imported models); fine: SegFormer's head refined at full resolution
    head: Literal["segformer", "mmseg", "fine"] = "segformer"
    decoder_channels: int | None = None  # the head's width, where not the encoder's usual one
    bands: list[str]
    band_mean: list[float]
    band_std: list[float]
    gsd_m: float
    pixel_size: list[float]
    crs: str
    chip_size: int
    threshold: float = 0.5
    train_year: int | None = None
    labels_fingerprint: str | None = None
    pretrained: str | None = None
    epochs_trained: int = 0
    best_epoch: int | None = None
    stopped: str = ""
    calibration: dict = {"scale": 1.0, "bias": 0.0}
    cloud_level: list[float] | None = None  # per band: pixels at least this bright in every band are clouds
    val_metrics: dict = {}
    test_metrics: dict = {}
    val_curve: list[dict] = []
    splits: dict = {}
    hard_negatives: dict = {}
    selection: dict = {}  # what training saw, what judged it, and how the epoch kept was chosen
    review: dict = {}  # reviewers' verdicts the training used, by kind (minemap.review.TrainingVerdicts.counts)
    precision: str = "fp32"  # the arithmetic of training's forward passes: fp32, or bf16 / fp16 (autocast)
    minemap_version: str = __version__

    def calibrate(self, logits: np.ndarray | torch.Tensor):
        """Calibrated P(mining) from raw logits: sigmoid(scale x logit + bias), fitted on validation chips."""
        z = self.calibration["scale"] * logits + self.calibration["bias"]
        return torch.sigmoid(z) if isinstance(z, torch.Tensor) else 1 / (1 + np.exp(-z))


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise InputError(f"device {name!r}: {e}") from None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a CUDA GPU that supports it; a CPU with AMX tiles or
    AVX512-BF16): there, bfloat16 autocast is faster; elsewhere it is emulated, and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
        return any(probe is not None and bool(probe()) for probe in probes)
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``precision`` on ``device`` (None: float32 throughout). ``auto`` is bfloat16 where
    the device computes in it natively (see :func:`native_bf16`), float16 on a GPU without it (training scales
    its loss), float32 elsewhere."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    raise InputError(f"precision {name!r}: choose auto, fp32, bf16 or fp16")


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def forward_logits(model: torch.nn.Module, x: torch.Tensor, precision: torch.dtype | None = None) -> torch.Tensor:
    """The mining logit at every input pixel: (B, H, W) in float32, upsampled from SegFormer's 1/4-resolution
    output (or as the ``fine`` head gives it, at full resolution). ``precision``: the autocast type of the
    network's layers (None: float32)."""
    with torch.autocast(x.device.type, dtype=precision or torch.float32, enabled=precision is not None):
        logits = model(pixel_values=x).logits
    if logits.shape[-2:] == x.shape[-2:]:
        return logits.float()[:, 0]
    return F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


class FineSegformer(SegformerForSemanticSegmentation):
    """SegFormer whose logits are refined at the input's full resolution (``head="fine"``).

    SegFormer's head predicts at a quarter of the input's resolution (19 m cells at 4.77 m, 40 m at 10 m) and its
    logits are upsampled bilinearly: a mine a dozen pixels wide, a dredging site's string of ponds, is blurred
    into its surroundings. Here a small convolutional branch reads the input at full resolution (two 3 x 3
    layers of ``FINE_CHANNELS``) and, with the upsampled logits, predicts a correction to them (two more
    layers); the last layer starts at zero, so an untrained branch changes nothing. On a CPU it adds about a fifth
    to a mit-b0's training step and a tenth to its forward pass (8 windows of 256 px)."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__(config)
        c, w = config.num_channels, FINE_CHANNELS
        self.fine = torch.nn.Sequential(torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.GELU(),
                                        torch.nn.Conv2d(w, w, 3, padding=1), torch.nn.GELU())
        self.fuse = torch.nn.Sequential(torch.nn.Conv2d(w + 1, w, 3, padding=1), torch.nn.GELU(),
                                        torch.nn.Conv2d(w, 1, 1))
        torch.nn.init.zeros_(self.fuse[-1].weight)
        torch.nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SemanticSegmenterOutput:
        coarse = super().forward(pixel_values=pixel_values, **kwargs).logits
        up = F.interpolate(coarse, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return SemanticSegmenterOutput(logits=up + self.fuse(torch.cat([self.fine(pixel_values), up], 1)))


def segformer_config(encoder: str, num_channels: int, decoder_channels: int | None = None) -> SegformerConfig:
    if encoder not in ENCODERS:
        raise ModelError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    spec = dict(ENCODERS[encoder])
    if decoder_channels:
        spec["decoder_hidden_size"] = decoder_channels
    return SegformerConfig(num_channels=num_channels, num_labels=1, **spec)


def build_model(encoder: str, num_channels: int, head: str = "segformer",
                decoder_channels: int | None = None) -> SegformerForSemanticSegmentation:
    """A freshly initialised SegFormer with one output logit. ``head="mmseg"``: MMSegmentation's head, whose
    stage projections end in a ReLU (their batch norms folded into the linear layers; see minemap.mmseg);
    ``decoder_channels``: the head's width where it differs from the encoder's usual one (MMSegmentation's
    mit-b2..b5 keep 256)."""
    config = segformer_config(encoder, num_channels, decoder_channels)
    model = FineSegformer(config) if head == "fine" else SegformerForSemanticSegmentation(config)
    if head == "mmseg":
        heads = getattr(model.decode_head, "linear_projections", None) or model.decode_head.linear_c
        for mlp in heads:
            mlp.proj = torch.nn.Sequential(mlp.proj, torch.nn.ReLU())
    elif head not in ("segformer", "fine"):
        raise ModelError(f"unknown decode head {head!r}")
    return model


def save_model(model: torch.nn.Module, card: ModelCard, dest: Path) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` into ``dest`` atomically (the folder is swapped whole)."""
    dest = Path(dest)
    with atomic_path(dest, kind="model") as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CARD).write_text(card.model_dump_json(indent=2) + "\n")
        for extra in ("train_state.pt",):  # keep resumable training state across checkpoint swaps
            if (dest / extra).exists():
                (tmp / extra).hardlink_to(dest / extra)
    return dest


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD
    if not Path(model_dir).is_dir():
        raise ModelError(f"{model_dir}: model directory not found")
    if not path.is_file():
        raise ModelError(f"{path}: model card missing (not a minemap model directory?)")
    try:
        return ModelCard.model_validate_json(path.read_text())
    except ValidationError as e:
        raise ModelError(f"{path}: invalid model card ({e.errors()[0]['msg']})") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[SegformerForSemanticSegmentation, ModelCard]:
    """Load a model directory written by :func:`save_model`."""
    card = read_card(model_dir)
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ModelError(f"{path}: weights missing")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: corrupt weights file ({e})") from None
    model = build_model(card.encoder, len(card.bands), card.head, card.decoder_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit a {card.encoder} with {len(card.bands)} bands "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model.to(device).eval(), card


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types on a bad file
        raise ModelError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: checkpoint holds no state dict")
    return obj


def _pretrained_encoder(path: Path, like: SegformerConfig) -> SegformerModel:
    """A SegformerModel from a Hugging Face folder (config.json + weights) or a bare weights file.

    Loading goes through transformers' ``from_pretrained``, so checkpoints published under older key names
    (``segformer.encoder.block...``) map onto the installed version's modules.
    """
    import tempfile

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json (a Hugging Face model folder holds config.json and "
                             "model.safetensors)")
        if not any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            raise ModelError(f"{path}: no model.safetensors or pytorch_model.bin inside")
        folder, tmp = path, None
    else:
        state = _read_state_dict(path)
        if any(k.startswith("backbone.") for k in state):
            raise ModelError(f"{path}: an MMSegmentation checkpoint; convert it to Hugging Face format first "
                             "(transformers' convert_segformer_original_to_pytorch.py)")
        tmp = tempfile.TemporaryDirectory(prefix="minemap-pretrained-")
        folder = Path(tmp.name)
    try:
        if tmp is not None:  # a bare file: give it the config of the model it is meant for
            first = next((v for k, v in state.items() if k.endswith("patch_embeddings.0.proj.weight")
                          or k.endswith("stages.0.patch_embeddings.proj.weight")), None)
            if first is None:
                raise ModelError(f"{path}: no SegFormer encoder weights found")
            cfg = SegformerConfig(**{**like.to_dict(), "num_channels": int(first.shape[1])})
            cfg.save_pretrained(folder)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        try:
            return SegformerModel.from_pretrained(folder, local_files_only=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelError(f"{path}: encoder size differs from the model's or weights are unusable "
                             f"({str(e).splitlines()[0][:200]})") from None
    finally:
        if tmp is not None:
            tmp.cleanup()


def load_pretrained_encoder(model: SegformerForSemanticSegmentation, checkpoint: Path | str) -> int:
    """Initialise ``model``'s encoder from a local Hugging Face SegFormer/MiT checkpoint (folder or file).

    The first patch embedding is adapted to the model's band count: RGB filters are kept, extra bands get the
    mean RGB filter, and all are rescaled so activations keep their magnitude. Returns the tensors loaded.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise ModelError(f"{checkpoint}: pretrained checkpoint not found locally; {DOWNLOAD_HINT}")
    enc = _pretrained_encoder(path, model.config)
    for attr in ("hidden_sizes", "depths"):
        if list(getattr(enc.config, attr)) != list(getattr(model.config, attr)):
            raise ModelError(f"{path}: encoder size differs from the model's ({attr} "
                             f"{list(getattr(enc.config, attr))} vs {list(getattr(model.config, attr))})")
    source = enc.state_dict()
    target = model.segformer.state_dict()
    loaded = {}
    for key, value in source.items():
        if key not in target:
            continue
        want = target[key].shape
        if value.shape != want and value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            n_in, n_out = value.shape[1], want[1]  # the first patch embedding: adapt the band count
            new = value.mean(dim=1, keepdim=True).repeat(1, n_out, 1, 1)
            new[:, : min(n_in, n_out)] = value[:, : min(n_in, n_out)]
            value = new * (n_in / n_out)
        if value.shape != want:
            raise ModelError(f"{path}: encoder size differs from the model's ({key}: {tuple(value.shape)} vs "
                             f"{tuple(want)})")
        loaded[key] = value
    if len(loaded) < 0.9 * len(target):
        raise ModelError(f"{path}: only {len(loaded)} of {len(target)} encoder tensors match this model")
    model.segformer.load_state_dict(loaded, strict=False)
    log.info("loaded %d encoder tensors from %s", len(loaded), path)
    return len(loaded)
