"""MMSegmentation SegFormer checkpoints (the published study's model) to and from minemap model directories.

MMSegmentation 1.x names a SegFormer ``backbone.layers.<stage>.{0: patch embedding, 1.<block>: blocks, 2: norm}``
and its head ``decode_head.{convs.<i>, fusion_conv, conv_seg}``; transformers names the same weights
``segformer...`` and ``decode_head...``. Two things differ beyond names:

- MMSegmentation's head projects each stage with a 1 x 1 convolution, batch norm and ReLU; transformers' with a
  linear layer alone. An imported model keeps MMSegmentation's head (``ModelCard.head = "mmseg"``): the batch
  norm is folded into the linear layer (exact in evaluation) and a ReLU follows it. Its fusion layer also takes
  the stages in the other order (1..4, not 4..1): its input channels are permuted.
- The study's model has two classes (background, mining) under a softmax. P(mining) = softmax(z)[1] =
  sigmoid(z1 - z0), so minemap's one logit is z1 - z0: the classifier's rows are subtracted. (The study's own
  prediction script took a sigmoid of z1 alone, which is not the probability the model was trained to give.)

The attention's packed input projection (``attn.attn.in_proj_weight``: query, key, value stacked) is split.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from rasterio.errors import NotGeoreferencedWarning

from minemap._io import atomic_path, stable_hash, write_json
from minemap.errors import InputError, ModelError
from minemap.formats.chips import SPLITS, read_index, read_meta
from minemap.model import ENCODERS, ModelCard, build_model, save_model

EPS = 1e-5  # BatchNorm's default epsilon in both libraries


def _hf_names(model) -> dict[str, str]:
    """Templates of the installed transformers' SegFormer key names (they changed across versions)."""
    keys = set(model.state_dict())
    if "segformer.stages.0.patch_embeddings.proj.weight" in keys:  # transformers 5.x
        return {"patch": "segformer.stages.{i}.patch_embeddings.proj", "patch_norm":
                "segformer.stages.{i}.patch_embeddings.layer_norm", "block": "segformer.stages.{i}.blocks.{j}",
                "norm1": "layernorm_before", "norm2": "layernorm_after", "q": "attention.q_proj",
                "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
                "sr": "attention.sequence_reduction.sequence_reduction",
                "sr_norm": "attention.sequence_reduction.layer_norm", "fc1": "mlp.fc1", "dw": "mlp.dwconv.dwconv",
                "fc2": "mlp.fc2", "stage_norm": "segformer.stages.{i}.layer_norm",
                "proj": "decode_head.linear_projections.{i}.proj"}
    if "segformer.encoder.patch_embeddings.0.proj.weight" in keys:  # transformers 4.x
        return {"patch": "segformer.encoder.patch_embeddings.{i}.proj", "patch_norm":
                "segformer.encoder.patch_embeddings.{i}.layer_norm", "block": "segformer.encoder.block.{i}.{j}",
                "norm1": "layer_norm_1", "norm2": "layer_norm_2", "q": "attention.self.query",
                "k": "attention.self.key", "v": "attention.self.value", "o": "attention.output.dense",
                "sr": "attention.self.sr", "sr_norm": "attention.self.layer_norm", "fc1": "mlp.dense1",
                "dw": "mlp.dwconv.dwconv", "fc2": "mlp.dense2", "stage_norm": "segformer.encoder.layer_norm.{i}",
                "proj": "decode_head.linear_c.{i}.proj"}
    raise ModelError("this transformers version names SegFormer's weights in a way minemap does not know")


def _shape(state: dict[str, torch.Tensor]) -> tuple[list[int], list[int], int, int, int]:
    """Depths, hidden sizes, input bands, classes and decoder channels of an MMSegmentation SegFormer."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"backbone\.layers\.(\d+)\.", k))})
    if not stages or "decode_head.conv_seg.weight" not in state:
        raise ModelError("not an MMSegmentation SegFormer checkpoint (no backbone.layers.* or decode_head.conv_seg)")
    depths = [len({int(m.group(1)) for k in state if (m := re.match(rf"backbone\.layers\.{i}\.1\.(\d+)\.", k))})
              for i in stages]
    hidden = [int(state[f"backbone.layers.{i}.0.projection.weight"].shape[0]) for i in stages]
    bands = int(state["backbone.layers.0.0.projection.weight"].shape[1])
    classes, channels = (int(n) for n in state["decode_head.conv_seg.weight"].shape[:2])
    return depths, hidden, bands, classes, channels


def encoder_of(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The minemap encoder name (mit-b0..b5) and band count of an MMSegmentation SegFormer state dict."""

    depths, hidden, bands, _, _ = _shape(state)
    for name, spec in ENCODERS.items():
        if list(spec["depths"]) == depths and list(spec["hidden_sizes"]) == hidden:
            return name, bands
    raise ModelError(f"an MMSegmentation SegFormer of depths {depths} and widths {hidden}: not one of mit-b0..b5")


def from_mmseg(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The weights of ``model`` (a minemap SegFormer with ``head="mmseg"``) from an MMSegmentation state dict."""
    depths, hidden, _, classes, _ = _shape(state)
    names = _hf_names(model)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ModelError(f"MMSegmentation checkpoint lacks {key}")
        return state[key].float()

    for i, depth in enumerate(depths):
        src = f"backbone.layers.{i}"
        for part, name in (("weight", "weight"), ("bias", "bias")):
            out[f"{names['patch'].format(i=i)}.{name}"] = take(f"{src}.0.projection.{part}")
            out[f"{names['patch_norm'].format(i=i)}.{name}"] = take(f"{src}.0.norm.{part}")
            out[f"{names['stage_norm'].format(i=i)}.{name}"] = take(f"{src}.2.{part}")
        for j in range(depth):
            b, dst = f"{src}.1.{j}", names["block"].format(i=i, j=j)
            q, k, v = take(f"{b}.attn.attn.in_proj_weight").chunk(3)
            qb, kb, vb = take(f"{b}.attn.attn.in_proj_bias").chunk(3)
            pairs = {"q": (q, qb), "k": (k, kb), "v": (v, vb),
                     "o": (take(f"{b}.attn.attn.out_proj.weight"), take(f"{b}.attn.attn.out_proj.bias")),
                     "norm1": (take(f"{b}.norm1.weight"), take(f"{b}.norm1.bias")),
                     "norm2": (take(f"{b}.norm2.weight"), take(f"{b}.norm2.bias")),
                     "fc1": (take(f"{b}.ffn.layers.0.weight")[:, :, 0, 0], take(f"{b}.ffn.layers.0.bias")),
                     "dw": (take(f"{b}.ffn.layers.1.weight"), take(f"{b}.ffn.layers.1.bias")),
                     "fc2": (take(f"{b}.ffn.layers.4.weight")[:, :, 0, 0], take(f"{b}.ffn.layers.4.bias"))}
            if f"{b}.attn.sr.weight" in state:
                pairs["sr"] = (take(f"{b}.attn.sr.weight"), take(f"{b}.attn.sr.bias"))
                pairs["sr_norm"] = (take(f"{b}.attn.norm.weight"), take(f"{b}.attn.norm.bias"))
            for part, (w, bias) in pairs.items():
                out[f"{dst}.{names[part]}.weight"], out[f"{dst}.{names[part]}.bias"] = w, bias
    # the head: per-stage 1 x 1 conv + batch norm (folded into one linear layer; the ReLU is the model's)
    for i in range(len(depths)):
        c = f"decode_head.convs.{i}"
        w, bias = _fold(take(f"{c}.conv.weight")[:, :, 0, 0], state.get(f"{c}.conv.bias"), state, f"{c}.bn")
        out[f"{names['proj'].format(i=i)}.0.weight"], out[f"{names['proj'].format(i=i)}.0.bias"] = w, bias
    n = len(depths)
    fuse = take("decode_head.fusion_conv.conv.weight")
    ch = fuse.shape[1] // n
    out["decode_head.linear_fuse.weight"] = torch.cat([fuse[:, s * ch:(s + 1) * ch] for s in reversed(range(n))], 1)
    for part in ("weight", "bias", "running_mean", "running_var"):
        out[f"decode_head.batch_norm.{part}"] = take(f"decode_head.fusion_conv.bn.{part}")
    out["decode_head.batch_norm.num_batches_tracked"] = torch.tensor(0)
    cls_w, cls_b = take("decode_head.conv_seg.weight"), take("decode_head.conv_seg.bias")
    if classes == 2:  # softmax over (background, mining) -> one logit, z1 - z0
        cls_w, cls_b = (cls_w[1] - cls_w[0])[None], (cls_b[1] - cls_b[0])[None]
    elif classes != 1:
        raise ModelError(f"an MMSegmentation model of {classes} classes: minemap needs 1 (mining) or 2 "
                         "(background, mining)")
    out["decode_head.classifier.weight"], out["decode_head.classifier.bias"] = cls_w, cls_b
    return out


def to_mmseg(model) -> dict[str, torch.Tensor]:
    """An MMSegmentation 1.x state dict (two classes, background and mining) of a minemap SegFormer with
    ``head="mmseg"``: the inverse of :func:`from_mmseg` (batch norms of the stage projections are identities)."""
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = _hf_names(model)
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for i, depth in enumerate(cfg.depths):
        dst = f"backbone.layers.{i}"
        for part in ("weight", "bias"):
            out[f"{dst}.0.projection.{part}"] = state[f"{names['patch'].format(i=i)}.{part}"]
            out[f"{dst}.0.norm.{part}"] = state[f"{names['patch_norm'].format(i=i)}.{part}"]
            out[f"{dst}.2.{part}"] = state[f"{names['stage_norm'].format(i=i)}.{part}"]
        for j in range(depth):
            b, src = f"{dst}.1.{j}", names["block"].format(i=i, j=j)

            def g(part: str, what: str = "weight") -> torch.Tensor:
                return state[f"{src}.{names[part]}.{what}"]

            out[f"{b}.attn.attn.in_proj_weight"] = torch.cat([g("q"), g("k"), g("v")])
            out[f"{b}.attn.attn.in_proj_bias"] = torch.cat([g("q", "bias"), g("k", "bias"), g("v", "bias")])
            out[f"{b}.attn.attn.out_proj.weight"], out[f"{b}.attn.attn.out_proj.bias"] = g("o"), g("o", "bias")
            for mm, hf in (("norm1", "norm1"), ("norm2", "norm2")):
                out[f"{b}.{mm}.weight"], out[f"{b}.{mm}.bias"] = g(hf), g(hf, "bias")
            out[f"{b}.ffn.layers.0.weight"], out[f"{b}.ffn.layers.0.bias"] = g("fc1")[:, :, None, None], g("fc1", "bias")
            out[f"{b}.ffn.layers.1.weight"], out[f"{b}.ffn.layers.1.bias"] = g("dw"), g("dw", "bias")
            out[f"{b}.ffn.layers.4.weight"], out[f"{b}.ffn.layers.4.bias"] = g("fc2")[:, :, None, None], g("fc2", "bias")
            if f"{src}.{names['sr']}.weight" in state:
                out[f"{b}.attn.sr.weight"], out[f"{b}.attn.sr.bias"] = g("sr"), g("sr", "bias")
                out[f"{b}.attn.norm.weight"], out[f"{b}.attn.norm.bias"] = g("sr_norm"), g("sr_norm", "bias")
    n = len(cfg.depths)
    for i in range(n):
        p, c = names["proj"].format(i=i), f"decode_head.convs.{i}"
        if f"{p}.0.weight" not in state:
            raise ModelError("only a model with MMSegmentation's head (head = 'mmseg') can be written as one")
        out[f"{c}.conv.weight"] = state[f"{p}.0.weight"][:, :, None, None]
        width = out[f"{c}.conv.weight"].shape[0]
        out[f"{c}.bn.weight"], out[f"{c}.bn.bias"] = torch.ones(width), state[f"{p}.0.bias"]
        out[f"{c}.bn.running_mean"], out[f"{c}.bn.running_var"] = torch.zeros(width), torch.full((width,), 1 - EPS)
    fuse = state["decode_head.linear_fuse.weight"]
    ch = fuse.shape[1] // n
    out["decode_head.fusion_conv.conv.weight"] = torch.cat([fuse[:, s * ch:(s + 1) * ch] for s in reversed(range(n))], 1)
    for part in ("weight", "bias", "running_mean", "running_var"):
        out[f"decode_head.fusion_conv.bn.{part}"] = state[f"decode_head.batch_norm.{part}"]
    w, b = state["decode_head.classifier.weight"], state["decode_head.classifier.bias"]
    out["decode_head.conv_seg.weight"] = torch.cat([torch.zeros_like(w), w])
    out["decode_head.conv_seg.bias"] = torch.cat([torch.zeros_like(b), b])
    return out


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, state: dict, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer followed by an evaluation-mode batch norm, as one linear layer."""
    gamma, beta = state[f"{bn}.weight"].float(), state[f"{bn}.bias"].float()
    mean, var = state[f"{bn}.running_mean"].float(), state[f"{bn}.running_var"].float()
    scale = gamma / torch.sqrt(var + EPS)
    b = bias.float() if bias is not None else torch.zeros_like(mean)
    return weight * scale[:, None], (b - mean) * scale + beta


class _Inert:
    """Stands for an object of MMEngine's own that its training checkpoints carry beside the weights (the
    message hub's history buffers): built empty, its state thrown away, MMEngine never imported or run."""

    def __setstate__(self, state) -> None:
        pass


# Globals of MMEngine that a training checkpoint pickles beside the weights, read as :class:`_Inert` (exact
# names: a module prefix would admit whatever a crafted file names under it)
INERT_GLOBALS = ("mmengine.logging.history_buffer.HistoryBuffer",)


def _numpy_globals() -> list[tuple[object, str]]:
    """The globals of numpy arrays and scalars as numpy pickles them (MMEngine's history buffers and metas hold
    them): the array and scalar rebuilders, ``numpy.ndarray``, ``numpy.dtype`` and the classes of the numeric
    dtypes (never the object dtype, whose arrays hold arbitrary objects), under numpy 1's and numpy 2's names."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out: list[tuple[object, str]] = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core.multiarray._reconstruct, f"{mod}._reconstruct"), (core.multiarray.scalar, f"{mod}.scalar")]
    for code in "?bBhHiIlLqQefdgFDG":
        cls = type(np.dtype(code))
        out.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return out


def _safe_globals() -> list:
    """What a checkpoint may name beyond torch's own weights-only set (tensors, storages, dtypes, OrderedDict,
    set, complex, bytes): frozenset, numpy arrays and scalars, and :data:`INERT_GLOBALS` as inert stand-ins."""
    return [frozenset, *_numpy_globals(), *((_Inert, name) for name in INERT_GLOBALS)]


def _refused(e: Exception) -> str | None:
    """The global a weights-only load refused, from torch's message (None: it failed for another reason)."""
    msg = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", msg) or \
        re.search(r"(?:unrecognized function|but got) (.+?)(?: which belongs|\n|$)", msg)
    return m.group(1).strip() if m else None


def _why(e: Exception) -> str:
    """One line of what torch says about an unreadable file (its own words after its boilerplate)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = (ln.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines)
                                                                          else ""))[:160]
            if rest.startswith("Unsupported operand"):  # a pickle opcode the weights-only reader lacks
                rest += ": not a pickle, or one of another protocol than torch.save's default (2)"
            return rest
    return (lines[0] if lines else type(e).__name__)[:160]


def read_mmseg(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an MMSegmentation checkpoint file (.pth with ``state_dict``, or a bare state dict).

    The file is read as data, never as code: torch's weights-only unpickler with an allow-list of exact globals
    (:func:`_safe_globals`); a file that names any other function or class (``os.system``, a torch helper that
    executes source, a class of another program) is refused with :class:`ModelError` naming it, and nothing of
    it runs. A checkpoint is a pickle, and a pickle may call whatever it names."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _refused(e)
        if name is not None:
            raise ModelError(f"{path}: refused: the checkpoint names {name}, which is not weights or plain data "
                             "(a checkpoint is read as data only, never run)") from None
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({_why(e)})") from None
    except Exception as e:  # truncated files, archives of other programs
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_why(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: holds no state dict")
    try:
        _shape(obj)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return obj


def import_mmseg(checkpoint: Path, dest: Path, bands: list[str], band_mean: list[float], band_std: list[float],
                 gsd_m: float, chip_size: int = 512, crs: str = "EPSG:3857", threshold: float = 0.5):
    """Write a minemap model directory from an MMSegmentation SegFormer checkpoint. ``bands``, ``band_mean`` and
    ``band_std``: the bands the model was trained on, in order, and the normalisation its pipeline applied to
    them (MMSegmentation's ``data_preprocessor`` mean and std, in the units of the imagery minemap will read);
    ``gsd_m``: the ground sample distance of its training imagery."""


    state = read_mmseg(checkpoint)
    encoder, n = encoder_of(state)
    for what, values in (("bands", bands), ("band means", band_mean), ("band stds", band_std)):
        if len(values) != n:
            raise ModelError(f"{checkpoint}: the model takes {n} bands; {len(values)} {what} given")
    channels = _shape(state)[4]
    decoder = channels if channels != ENCODERS[encoder]["decoder_hidden_size"] else None
    model = build_model(encoder, n, "mmseg", decoder)
    try:
        model.load_state_dict(from_mmseg(state, model))
    except RuntimeError as e:
        raise ModelError(f"{checkpoint}: weights do not fit a {encoder} ({str(e).splitlines()[-1].strip()})") from None
    card = ModelCard(encoder=encoder, head="mmseg", decoder_channels=decoder, bands=list(bands), band_mean=list(band_mean),
                     band_std=list(band_std), gsd_m=gsd_m, pixel_size=[gsd_m, gsd_m], crs=crs, chip_size=chip_size,
                     threshold=threshold, pretrained=str(checkpoint),
                     stopped=f"imported from the MMSegmentation checkpoint {Path(checkpoint).name}")
    save_model(model.eval(), card, dest)
    return card


# -- the dataset layout ---------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg")


def write_layout(chips_dir: Path, dest: Path) -> int:
    """Our chips in MMSegmentation's layout, as the study's scripts expect it:
    ``dest/<year>/img_dir/<split>/<chip_id>.tif`` (every band, reflectance as cut: load them with MMSegmentation's
    ``imdecode_backend='tifffile'``) and ``dest/<year>/ann_dir/<split>/<chip_id>.png`` (0 background, 1 mining,
    255 ignored: MMSegmentation's default ``ignore_index``). Returns the chips written."""
    import shutil

    import rasterio


    meta = read_meta(chips_dir)
    index = read_index([Path(chips_dir)])
    year = str(meta["year"])
    with atomic_path(Path(dest) / year, kind="mmseg") as tmp:
        for row in index.itertuples():
            img = tmp / "img_dir" / row.split / f"{row.chip_id}.tif"
            ann = tmp / "ann_dir" / row.split / f"{row.chip_id}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            ann.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(row.root) / row.image, img)
            with rasterio.open(Path(row.root) / row.mask) as src:
                mask = src.read(1)
            with warnings.catch_warnings():  # a PNG has no place on Earth, as MMSegmentation expects
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(ann, "w", driver="PNG", width=mask.shape[1], height=mask.shape[0], count=1,
                                   dtype="uint8") as dst:
                    dst.write(mask, 1)
    return len(index)


def read_layout(year_dir: Path, dest: Path, bands: list[str] | None = None, gsd_m: float = 4.77) -> int:
    """A chips folder (``index.parquet``, ``meta.json``) over the study's layout ``<year>/img_dir/<split>/<id>.*``
    with masks ``<year>/ann_dir/<split>/<id>.png`` (0 background, 1 mining, 255 ignored), so that ``train``
    reads it. The images stay where they are (the index points at them). Such chips have no place on Earth:
    ``gsd_m`` and ``bands`` say what they are. Returns the chips found."""
    import geopandas as gpd
    import numpy as np
    import rasterio
    from rasterio.errors import RasterioError


    year_dir = Path(year_dir).resolve()
    rows, size, count = [], None, None
    for split in SPLITS:
        folder = year_dir / "img_dir" / split
        if not folder.is_dir():
            continue
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            ann = year_dir / "ann_dir" / split / f"{img.stem}.png"
            if not ann.is_file():
                raise InputError(f"{img}: no mask {ann.relative_to(year_dir)}")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    with rasterio.open(img) as src:
                        shape, n = (src.height, src.width), src.count
                    with rasterio.open(ann) as src:
                        mask = src.read(1)
            except RasterioError as e:
                raise InputError(f"{img.parent}: unreadable chip ({e})") from None
            if mask.shape != shape:
                raise InputError(f"{ann}: mask is {mask.shape[1]} x {mask.shape[0]}, image {shape[1]} x {shape[0]}")
            if not set(np.unique(mask)) <= {0, 1, 255}:
                raise InputError(f"{ann}: mask values {sorted(np.unique(mask))[:6]} (expected 0 background, "
                                 "1 mining, 255 ignored)")
            size, count = size or shape, count or n
            if shape != size or n != count:
                raise InputError(f"{img}: {shape[1]} x {shape[0]} px, {n} bands, unlike the first chip "
                                 f"({size[1]} x {size[0]}, {count} bands)")
            pos = int((mask == 1).sum())
            rows.append({"chip_id": img.stem, "split": split, "kind": "positive" if pos else "background",
                         "year": _year_of(year_dir), "image": str(img), "mask": str(ann), "block": split,
                         "positive_fraction": pos / mask.size, "valid_fraction": float((mask != 255).mean()),
                         "positive_pixels": pos})
    if not rows:
        raise InputError(f"{year_dir}: no chips in img_dir/{{train,val,test}} (the MMSegmentation layout)")
    if size[0] != size[1]:
        raise InputError(f"{year_dir}: chips of {size[1]} x {size[0]} px; minemap trains on square chips")
    names = list(bands) if bands else ["red", "green", "blue", "nir"][:count] if count <= 4 else \
        [f"b{i + 1}" for i in range(count)]
    if len(names) != count:
        raise InputError(f"{year_dir}: chips have {count} bands, {len(names)} named ({', '.join(names)})")
    index = gpd.GeoDataFrame(rows, geometry=[None] * len(rows), crs="EPSG:4326")
    meta = {"year": _year_of(year_dir), "bands": names, "crs": "EPSG:3857", "pixel_size": [gsd_m, gsd_m],
            "gsd_m": gsd_m, "chip_size": int(size[0]), "block_size": int(size[0]), "block_size_from": "mmseg layout",
            "labels_fingerprint": stable_hash(sorted((r["image"], r["positive_pixels"]) for r in rows)),
            "source": {"mmseg_layout": str(year_dir)}}
    with atomic_path(Path(dest), kind="chips") as tmp:
        index.to_parquet(tmp / "index.parquet")
        write_json(tmp / "meta.json", meta)
    return len(rows)


def _year_of(year_dir: Path) -> int | None:
    name = Path(year_dir).name
    return int(name) if name.isdigit() else None
