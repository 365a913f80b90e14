"""CLIP's symmetric contrastive loss, computed locally on each rank.

Each rank gathers the features of every rank *with gradients*, then scores only its
own rows against all columns: its images against every caption, its captions against
every image, with the matching pair of local row ``i`` at global column
``rank * local_batch + i``. Memory and compute per rank are linear in the global batch
(``local x global`` logits, not ``global x global``), and DDP's gradient averaging over
ranks turns the sum of local losses into the gradient of the global loss.

The logit scale is CLIP's learnable temperature, ``exp(log_scale)``, clamped at 100:
the loop clamps the parameter after each step and the loss clamps the value it is
given, so neither an old checkpoint nor a caller can feed a larger one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0


def gather_with_grad(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """All ranks' rows, in rank order; gradients flow back to the rank that owns each row."""
    if world_size == 1:
        return features
    import torch.distributed.nn.functional as dist_nn  # imported late: needs a process group

    return torch.cat(dist_nn.all_gather(features), dim=0)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy for this rank's rows.

    ``image_features`` / ``text_features`` are this rank's L2-normalised embeddings
    (same local batch size on every rank); ``logit_scale`` is the already
    exponentiated temperature, as open_clip's CLIP returns it.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE)
    all_images = gather_with_grad(image_features, world_size)
    all_texts = gather_with_grad(text_features, world_size)
    logits_per_image = scale * image_features @ all_texts.T
    logits_per_text = scale * text_features @ all_images.T
    local = image_features.shape[0]
    labels = torch.arange(local, device=image_features.device) + rank * local
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
