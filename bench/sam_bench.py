"""Batched SamSegmenter vs segment_anything's SamPredictor, same random weights, images and boxes.

    .venv/bin/python bench/sam_bench.py                      # vit_b, 4 images, batches of 4
    .venv/bin/python bench/sam_bench.py --images 8 --batch-size 4 --variant vit_b --device cuda

Prints images/s of both paths, their ratio, and the mean IoU between the two paths' masks (union over
each image's boxes, no component filtering). The predictor path is what the reference does: set_image
per image, then one predict() per box. Both run in this process, one after the other.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from segment_anything import SamPredictor

from mcs_batch.models.sam import SamSegmenter, SamVariant, random_sam


def _cases(n: int, seed: int, min_side: int, max_side: int):
    """n RGB uint8 images of random non-square sizes, each with 1-2 random boxes (XYXY pixels)."""
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for _ in range(n):
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = rng.integers(0, 256, 3)
        images.append(image)
        image_boxes = []
        for _ in range(int(rng.integers(1, 3))):
            x0, x1 = sorted(rng.integers(0, width, 2))
            y0, y1 = sorted(rng.integers(0, height, 2))
            image_boxes.append([x0, y0, max(x1, x0 + 8), max(y1, y0 + 8)])
        boxes.append(np.asarray(image_boxes, dtype=np.float32))
    return images, boxes


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _predictor_masks(model, images, boxes, device):
    predictor = SamPredictor(model)
    masks = []
    _sync(device)
    start = time.perf_counter()
    for image, image_boxes in zip(images, boxes, strict=True):
        predictor.set_image(image)
        union = np.zeros(image.shape[:2], dtype=bool)
        for box in image_boxes:
            mask, _, _ = predictor.predict(box=box, multimask_output=False)
            union |= mask[0]
        masks.append(union)
    _sync(device)
    return masks, time.perf_counter() - start


def _batched_masks(segmenter, images, boxes, batch_size, device):
    masks = []
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        chunk = slice(first, first + batch_size)
        embeddings = segmenter.embed(images[chunk])  # one encoder call per batch, as the job's SAM stage
        masks.extend(segmenter.segment(embeddings, i, b, k_components=None).mask for i, b in enumerate(boxes[chunk]))
    _sync(device)
    return masks, time.perf_counter() - start


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b", choices=[v.value for v in SamVariant])
    parser.add_argument("--images", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per encoder call (default 4)")
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="fp32, or bf16 / fp16 on CUDA (batched only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", action="store_true", help="one untimed small image through both paths")
    args = parser.parse_args(argv)

    model = random_sam(args.variant, seed=args.seed).to(args.device)
    segmenter = SamSegmenter(model, precision=args.precision)
    images, boxes = _cases(args.images, args.seed, args.min_side, args.max_side)
    print(
        f"SAM {args.variant} (random weights) on {args.device}, torch threads {torch.get_num_threads()}, "
        f"{args.images} images {args.min_side}-{args.max_side} px, {sum(map(len, boxes))} boxes, "
        f"batch size {args.batch_size}, precision {args.precision}"
    )
    if args.warmup:
        _predictor_masks(model, images[:1], boxes[:1], args.device)
        _batched_masks(segmenter, images[:1], boxes[:1], 1, args.device)

    reference, predictor_s = _predictor_masks(model, images, boxes, args.device)
    batched, batched_s = _batched_masks(segmenter, images, boxes, args.batch_size, args.device)

    ious = [_iou(a, b) for a, b in zip(reference, batched, strict=True)]
    predictor_rate, batched_rate = args.images / predictor_s, args.images / batched_s
    print(f"SamPredictor per image : {predictor_s:8.2f} s  {predictor_rate:7.3f} images/s")
    print(f"SamSegmenter batched   : {batched_s:8.2f} s  {batched_rate:7.3f} images/s")
    print(f"speed-up batched/predictor: {batched_rate / predictor_rate:.2f}x")
    print(f"mask IoU batched vs predictor: mean {np.mean(ious):.5f}, min {np.min(ious):.5f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
