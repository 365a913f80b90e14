"""CLIP's symmetric contrastive loss and SigLIP's pairwise sigmoid loss, computed locally on each rank.

Each rank gathers the features of every rank *with gradients*, then scores only its
own rows against all columns: its images against every caption, its captions against
every image, with the matching pair of local row ``i`` at global column
``rank * local_batch + i``. Memory and compute per rank are linear in the global batch
(``local x global`` logits, not ``global x global``), and DDP's gradient averaging over
ranks turns the sum of local losses into the gradient of the global loss.

The logit scale is CLIP's learnable temperature, ``exp(log_scale)``, clamped at 100:
the loop clamps the parameter after each step and the loss clamps the value it is
given, so neither an old checkpoint nor a caller can feed a larger one.

SigLIP (``siglip_loss``) scores every (image, caption) pair on its own, a sigmoid with a
learnable bias, so no row needs the whole batch at once: each rank scores its images
against its own captions, then passes caption chunks around the ring of ranks
(``world_size - 1`` neighbour exchanges, gradients sent back the same way), never
gathering the features or the logits of the whole batch.
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


def _exchange(tensor: torch.Tensor, to: int, source: int) -> torch.Tensor:
    """Send ``tensor`` to rank ``to`` and return what rank ``source`` sent (every rank calls it together)."""
    import torch.distributed as dist  # imported late: needs a process group

    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingPass(torch.autograd.Function):
    """The previous rank's tensor, for ours sent to the next; gradients travel the ring backwards."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.next, ctx.previous = (rank + 1) % world_size, (rank - 1) % world_size
        return _exchange(tensor, ctx.next, ctx.previous)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.previous, ctx.next), None, None


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Sum over this rank's images and every caption of ``-log sigmoid(sign * (scale * cos + bias))``, per local image.

    ``sign`` is +1 for a matching pair, -1 otherwise. Divided by the local batch, as
    open_clip's ``SigLipLoss`` does: DDP's mean over ranks then equals one process's loss
    on the combined batch. Features and ``logit_scale`` as for ``clip_loss``.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE)

    def block(texts: torch.Tensor, matching: bool) -> torch.Tensor:
        logits = scale * image_features @ texts.T + logit_bias
        if matching:
            signs = 2 * torch.eye(len(image_features), device=logits.device, dtype=logits.dtype) - 1
            return -F.logsigmoid(signs * logits).sum()
        return -F.logsigmoid(-logits).sum()

    total = block(text_features, True)
    texts = text_features
    for _ in range(world_size - 1):
        texts = _RingPass.apply(texts, rank, world_size)
        total = total + block(texts, False)
    return total / image_features.shape[0]
