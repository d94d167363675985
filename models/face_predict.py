"""`models.predict` on raw photos: detect every face, align it to the model's input, classify it,
and optionally draw the result onto the photo (`--annotate`).

One entry per face: {"path", "face" (0 = largest), "box" [x0, y0, x1, y1], "detector_score",
"landmarks" (5 [x, y] or null), "label", "probabilities"}; a photo without a face gets one entry
{"path", "face": null, ..., "label": null, "status": "no face found"}.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from . import data as fer_data
from . import faces, overlay, recipes

NO_FACE = "no face found"
BOX_COLOUR = (0, 255, 0)
ATTENTION_ALPHA = 0.45  # DAN: opacity of the attention colours over the face
PATCH_SHADE = (0.0, 0.35, 0.65)  # APViT: darkening of kept / dropped-by-token / dropped-by-patch pooling


def _no_face_entry(path: str) -> dict:
    return {"path": path, "face": None, "box": None, "detector_score": None, "landmarks": None,
            "label": None, "probabilities": None, "status": NO_FACE}


def _classify(model, model_name: str, batch: torch.Tensor):
    """(probabilities [n, classes], per-face attention as crop-space arrays [n, S, S] in 0..1) where
    APViT's value is the patch shade (0 kept to the end) and DAN's the heads' mean attention."""
    size = batch.shape[-1]
    if model_name == "apvit":
        logits, pooling = model(batch, return_pooling=True)
        rows, cols = pooling.grid
        shade = torch.full((batch.shape[0], rows * cols), PATCH_SHADE[2])
        shade.scatter_(1, pooling.patch_index.cpu(), PATCH_SHADE[1])
        shade.scatter_(1, pooling.kept_positions().cpu(), PATCH_SHADE[0])
        maps = F.interpolate(shade.view(-1, 1, rows, cols), size=(size, size), mode="nearest")[:, 0]
    else:
        logits, features, _ = model(batch)
        att = model.cross_attention.spatial_attention(features).float().mean(1, keepdim=True).cpu()
        att = F.interpolate(att, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        low = att.flatten(1).min(1).values.view(-1, 1, 1)
        high = att.flatten(1).max(1).values.view(-1, 1, 1)
        maps = (att - low) / (high - low).clamp_min(1e-12)
    return torch.softmax(logits.float(), dim=1).cpu(), maps


def _attention_layer(model_name: str, amap: torch.Tensor) -> Image.Image:
    """Crop-space RGBA layer: APViT black with the patch shade as alpha, DAN the jet colours."""
    if model_name == "apvit":
        alpha = (amap.numpy() * 255).astype(np.uint8)
        rgb = np.zeros(alpha.shape + (3,), np.uint8)
    else:
        from matplotlib import colormaps

        rgb = (colormaps["jet"](amap.clamp(0, 1).numpy())[..., :3] * 255).astype(np.uint8)
        alpha = np.full(amap.shape, int(255 * ATTENTION_ALPHA), np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def _paste_warped(photo: Image.Image, layer: Image.Image, crop_to_photo: np.ndarray) -> Image.Image:
    """Alpha-composite a crop-space RGBA layer onto the photo through the crop -> photo matrix."""
    full = np.vstack([crop_to_photo, [0.0, 0.0, 1.0]])
    photo_to_crop = np.linalg.inv(full)[:2]
    a, b, c = photo_to_crop[0]
    d, e, f = photo_to_crop[1]
    # the same pixel-centre shift as faces.warp_affine, for a non-square output
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    warped = layer.transform(photo.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0, 0))
    return Image.alpha_composite(photo.convert("RGBA"), warped)


def _font(photo: Image.Image):
    size = max(12, round(max(photo.size) / 45))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _caption(draw: ImageDraw.ImageDraw, xy, text: str, font, photo_size) -> None:
    """`text` on a filled background at xy (its top-left), kept inside the photo."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height, pad = right - left, bottom - top, 3
    x = min(max(0.0, xy[0]), max(0.0, photo_size[0] - width - 2 * pad))
    y = min(max(0.0, xy[1]), max(0.0, photo_size[1] - height - 2 * pad))
    draw.rectangle([x, y, x + width + 2 * pad, y + height + 2 * pad], fill=(0, 0, 0, 200))
    draw.text((x + pad - left, y + pad - top), text, fill=(255, 255, 255, 255), font=font)


def annotate_photo(photo: Image.Image, model_name: str, entries: list, layers: list, matrices: list) -> Image.Image:
    """The photo with, per face, the attention layer warped onto it, the box, the landmarks and a
    caption "k: label p%"; "no face found" when `entries` has no face."""
    out = photo.convert("RGBA")
    for layer, matrix in zip(layers, matrices):
        out = _paste_warped(out, layer, matrix)
    draw = ImageDraw.Draw(out, "RGBA")
    font = _font(photo)
    line = max(2, round(max(photo.size) / 300))
    for entry in entries:
        if entry["face"] is None:
            _caption(draw, (4, 4), NO_FACE, font, photo.size)
            continue
        x0, y0, x1, y1 = entry["box"]
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR + (255,), width=line)
        for x, y in entry["landmarks"] or []:
            draw.ellipse([x - line, y - line, x + line, y + line], fill=(255, 0, 0, 255))
        p = entry["probabilities"][entry["label"]]
        text = f"{entry['face']}: {entry['label']} {100 * p:.0f}%"
        height = draw.textbbox((0, 0), text, font=font)[3] + 6
        _caption(draw, (x0, y0 - height if y0 >= height else y1), text, font, photo.size)
    return out.convert("RGB")


@torch.no_grad()
def predict_faces(args) -> list[dict]:
    """Detect, align, classify every face of every input photo (see the module docstring)."""
    from .predict import expand_inputs, load_model

    device, model = load_model(args)
    classes = list(model.classes)
    detector = faces.FaceDetector(args.detector, device=device if args.detector == "mtcnn" else "cpu",
                                  min_face_size=args.min_face_size, threshold=args.detector_threshold)
    transform = recipes.eval_transform(model)
    size = model.input_size
    paths = expand_inputs(args.inputs)
    for folder in (args.annotate, args.attention_out):
        if folder:
            os.makedirs(folder, exist_ok=True)
    results = []
    for index, path in enumerate(tqdm(paths, desc="predict", leave=False)):
        photo = fer_data.load_image(path)
        found = detector(photo)
        entries, layers, matrices = [], [], []
        for start in range(0, len(found), args.batch_size):
            chunk = found[start:start + args.batch_size]
            aligned = [faces.align_face(photo, face, args.model, size) for face in chunk]
            batch = torch.stack([transform(crop) for crop, _ in aligned]).to(device)
            probs, maps = _classify(model, args.model, batch)
            for k, (face, (crop, matrix), row, amap) in enumerate(zip(chunk, aligned, probs, maps)):
                entry = {"path": path, "face": start + k, **face.to_json(), "label": classes[int(row.argmax())],
                         "probabilities": {c: float(p) for c, p in zip(classes, row)}}
                entries.append(entry)
                layers.append(_attention_layer(args.model, amap))
                matrices.append(matrix)
                if args.attention_out:
                    _write_crop_overlay(args, model, crop, batch[k:k + 1], entry, index)
        if not entries:
            entries.append(_no_face_entry(path))
        if args.annotate:
            stem = os.path.splitext(os.path.basename(path))[0]
            annotate_photo(photo, args.model, entries, layers, matrices).save(
                os.path.join(args.annotate, f"{index:05d}_{stem}_faces.png"))
        results.extend(entries)
    return results


def _write_crop_overlay(args, model, crop: Image.Image, image: torch.Tensor, entry: dict, index: int) -> None:
    """--attention-out with detection: the --no-detect overlay of one aligned face."""
    caption = f"{os.path.basename(entry['path'])} face {entry['face']}: {entry['label']}"
    if args.model == "apvit":
        _, pooling = model(image, return_pooling=True)
        png = overlay.apvit_overlay(crop, pooling.patch_index[0].cpu(), pooling.kept_positions()[0].cpu(),
                                    tuple(pooling.grid), caption)
    else:
        png = overlay.dan_overlay(crop, model.spatial_attention(image)[0].cpu(), caption)
    stem = os.path.splitext(os.path.basename(entry["path"]))[0]
    png.save(os.path.join(args.attention_out, f"{index:05d}_{stem}_face{entry['face']}_attention.png"))
