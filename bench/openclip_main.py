"""open_clip_train's own entry point, with webclip's model configs registered first.

    .bench/openclip/bin/python -m bench.openclip_main --model webclip-tiny --train-data ...

open_clip looks model names up in its registry; our configs live in
train/model_configs/, so they are added (``open_clip.add_model_config``) and then
``open_clip_train.main.main`` runs unchanged with the given arguments.
"""

import sys
from pathlib import Path

import open_clip
from open_clip_train.main import main

if __name__ == "__main__":
    open_clip.add_model_config(Path(__file__).resolve().parent.parent / "train" / "model_configs")
    main(sys.argv[1:])
