"""Data loading alone: tar shards -> device-ready batches, ours or open_clip's pipeline.

    .venv/bin/python -m bench.loader_rate --tool webclip --shards data/demo/train
    .bench/openclip/bin/python -m bench.loader_rate --tool open_clip --shards data/demo/train

Run from the repository root (the peer's venv finds our packages through the working
directory). Both sides get the same transform: decode, resize the short side to
``--image_size`` (bicubic), centre crop, a normalised float batch on the device (the
CPU here). open_clip's side is its own ``get_wds_dataset`` (webdataset 0.2.86, PIL
decode, torchvision transform that normalises in the worker); ours is
``train.data.ShardStream`` (DCT-scaled decode, uint8 across the process boundary,
normalised on the device). Prints one JSON line: samples/s over ``--batches`` batches
after ``--warmup`` batches.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD
STD = (0.26862954, 0.26130258, 0.27577711)


def _ours(args) -> tuple[object, callable]:
    import open_clip

    from train.data import ShardStream, list_shards, make_loader

    tokenizer = open_clip.get_tokenizer("RN50")
    stream = ShardStream(
        shards=list_shards(args.shards), batch_size=args.batch_size, image_size=args.image_size,
        tokenize=tokenizer, seed=0, shuffle_buffer=args.shuffle_buffer,
    )  # fmt: skip
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def ready(batch):
        return (batch.images.float() - mean) / std, batch.texts

    return make_loader(stream, args.workers), ready


def _open_clip(args) -> tuple[object, callable]:
    import open_clip
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args
    from torchvision import transforms

    tars = sorted(glob.glob(os.path.join(args.shards, "*.tar")))
    first, last = os.path.basename(tars[0])[:-4], os.path.basename(tars[-1])[:-4]
    oc_args = parse_args([
        "--train-data", os.path.join(args.shards, f"{{{first}..{last}}}.tar"), "--dataset-type", "webdataset",
        "--train-num-samples", str(args.batch_size * (args.batches + args.warmup) * 4),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--seed", "0",
    ])  # fmt: skip
    oc_args.world_size, oc_args.rank, oc_args.local_rank, oc_args.distributed = 1, 0, 0, False
    transform = transforms.Compose([
        transforms.Resize(args.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.image_size), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])  # fmt: skip
    data = get_wds_dataset(oc_args, transform, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("RN50"))
    return data.dataloader, lambda batch: batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tool", choices=("webclip", "open_clip"), required=True)
    p.add_argument("--shards", default="data/demo/train")
    p.add_argument("--image_size", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--shuffle_buffer", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)  # the main process only collects and normalises
    loader, ready = (_ours if args.tool == "webclip" else _open_clip)(args)
    seen, start = 0, None
    for i, batch in enumerate(loader):
        images, tokens = ready(batch)
        if i == args.warmup:  # the clock starts when this batch is in hand
            start = time.perf_counter()
        elif i > args.warmup:
            seen += images.shape[0]
        if i >= args.warmup + args.batches:
            break
    seconds = time.perf_counter() - start
    print(json.dumps({"tool": args.tool, "samples": seen, "seconds": round(seconds, 2),
                      "samples_per_s": round(seen / seconds, 1), "workers": args.workers,
                      "image_size": args.image_size, "batch_size": args.batch_size}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
