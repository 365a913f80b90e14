"""Issue 19 on the CPU: honest FLOPs, the fast towers against open_clip's own, bf16 master weights,
the compiled step, SigLIP, fine-tuning from pretrained weights."""

from __future__ import annotations

import copy
import json
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F

import _train_fixtures as fx
from core.device import Compute
from core.errors import DataError
from train import checkpoint as ckpt
from train import fast, throughput
from train import model as model_mod
from train.config import ConfigError, OptimConfig, load_config
from train.loop import build_stepper, train, train_step
from train.loss import siglip_loss

VIT_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def vit_tiny(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("vit")
    with open(folder / "webclip-test-vit.json", "w") as handle:
        json.dump(VIT_TINY, handle)
    return model_mod.register_model_config(folder / "webclip-test-vit.json")


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("shards"))
    fx.write_train_shards(folder, samples=16, per_shard=8, seed=4, noise=0.0)
    return folder


def _batch(model, batch: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = model_mod.image_size_of(model)
    images = torch.randn(batch, 3, size, size, generator=generator)
    texts = torch.randint(1, 49000, (batch, model.context_length), generator=generator)
    texts[:, -3:] = 0  # padding after the end token, as the tokenizer writes it
    texts[:, -4] = 49407
    return images, texts


def _outputs_and_grads(model, images, texts):
    model.zero_grad(set_to_none=True)
    image_features, text_features, _ = model(images, texts)[:3]
    weights = torch.linspace(-1, 1, image_features.shape[1])
    ((image_features * weights).sum() + (text_features * weights.flip(0)).sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return image_features.detach(), text_features.detach(), grads


# -- FLOPs --------------------------------------------------------------------------------------


def test_flops_are_counted_as_training_computes_them():
    """open_clip's profile: ViT-B-32 14.78, ViT-B-16 41.09 GFLOP forward; within 1%.

    ViT-B-32 on real CPU tensors, where eval mode would take nn.MultiheadAttention's fused
    path (11.85 GFLOP); ViT-B-16 on the meta device (no memory, no arithmetic).
    """
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    forward = throughput.train_flops_per_sample(model, 224, torch.device("cpu")) / 3
    assert forward / 1e9 == pytest.approx(14.78, rel=0.01)
    fast.speed_up(model)  # the same count through the fast modules
    assert throughput.train_flops_per_sample(model, 224, torch.device("cpu")) / 3 == pytest.approx(forward, rel=1e-3)
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", device="meta")
    forward = throughput.train_flops_per_sample(model, 224, torch.device("meta")) / 3
    assert forward / 1e9 == pytest.approx(41.09, rel=0.01)


# -- the fast towers against open_clip's own modules ---------------------------------------------


@pytest.mark.parametrize("name", ["webclip-test-vit", "webclip-tiny"])
def test_fast_modules_compute_what_open_clip_computes(vit_tiny, name):
    """fp32, outputs and every gradient: ViT (attention + patch embedding) and ResNet + text transformer."""
    torch.manual_seed(0)
    reference = model_mod.create_model(name)
    ours = copy.deepcopy(reference)
    swapped = fast.speed_up(ours)
    assert swapped == ({"attention": 4, "patch_embed": 1} if name == "webclip-test-vit" else
                       {"attention": 2, "patch_embed": 0})  # fmt: skip
    assert ours.transformer.resblocks[0].attn.causal  # the text tower's mask is the causal one
    if name == "webclip-test-vit":
        assert not ours.visual.transformer.resblocks[0].attn.causal
    images, texts = _batch(reference)
    layouts = (torch.contiguous_format, torch.channels_last) if name == "webclip-test-vit" else (torch.contiguous_format,)
    for layout in layouts:  # the patch embedding reads either layout
        laid_out = images.contiguous(memory_format=layout)
        want = _outputs_and_grads(reference, laid_out, texts)
        got = _outputs_and_grads(ours, laid_out, texts)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        assert got[2].keys() == want[2].keys()
        for key in want[2]:
            torch.testing.assert_close(got[2][key], want[2][key], rtol=1e-4, atol=1e-6, msg=key)


def test_fast_model_state_dicts_load_both_ways(vit_tiny, tmp_path):
    """Ours into open_clip's own (through its loader, from a file) and open_clip's into ours: the same function."""
    torch.manual_seed(1)
    ours = model_mod.create_model("webclip-test-vit")
    fast.speed_up(ours)
    path = tmp_path / "ours.pt"
    torch.save({"state_dict": ours.state_dict()}, path)
    theirs = open_clip.create_model("webclip-test-vit", pretrained=str(path))
    images, texts = _batch(ours)
    for a, b in zip(ours.eval()(images, texts)[:2], theirs.eval()(images, texts)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    torch.manual_seed(2)
    other = open_clip.create_model("webclip-test-vit")
    ours.load_state_dict(other.state_dict())  # strict: every name and shape the same
    for a, b in zip(ours(images, texts)[:2], other.eval()(images, texts)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- bf16 weights with fp32 master weights; the compiled step --------------------------------------


def _stepper(name: str, worker_dtype=None, compile: bool = False, loss: str = "clip"):
    torch.manual_seed(0)
    model = model_mod.create_model(name, siglip=loss == "siglip")
    fast.speed_up(model)
    compute = Compute(torch.device("cpu"), None, torch.get_num_threads())
    return build_stepper(model, compute, OptimConfig(lr=1e-3, warmup_steps=1), channels_last=True, compile=compile,
                         loss=loss, worker_dtype=worker_dtype)  # fmt: skip


def _batches(model, steps: int):
    size = model_mod.image_size_of(model)
    generator = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.randint(1, 49000, (8, model.context_length), generator=generator)) for _ in range(steps)]  # fmt: skip


def _train(stepper, batches) -> list[float]:
    return [train_step(stepper, [batch], 1, 1e-3).item() for batch in batches]


def test_master_weights_step_trains_like_the_model_itself(vit_tiny):
    """A worker copy in fp32 gives exactly the plain step; in bf16 the master weights stay fp32 and train alike."""
    plain = _stepper("webclip-test-vit")
    batches = _batches(plain.model, 3)
    plain_losses = _train(plain, batches)
    mirrored = _stepper("webclip-test-vit", worker_dtype=torch.float32)
    assert _train(mirrored, batches) == plain_losses
    for (name, a), b in zip(plain.model.state_dict().items(), mirrored.model.state_dict().values()):
        assert torch.equal(a, b), name

    half = _stepper("webclip-test-vit", worker_dtype=torch.bfloat16)
    half_losses = _train(half, batches)
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.worker.parameters())
    assert half_losses == pytest.approx(plain_losses, rel=0.02)
    start = torch.cat([p.flatten() for p in _stepper("webclip-test-vit").model.parameters()])
    plain_now = torch.cat([p.detach().flatten() for p in plain.model.parameters()])
    half_now = torch.cat([p.detach().flatten() for p in half.model.parameters()])
    assert (half_now - plain_now).abs().mean() < 0.5 * (plain_now - start).abs().mean()  # the same direction
    assert not torch.equal(half_now, half_now.to(torch.bfloat16).float())  # the master keeps fp32's precision
    for master, worker in zip(half.model.parameters(), half.worker.parameters()):
        assert torch.equal(worker, master.to(torch.bfloat16))  # the worker is the master, rounded


def test_compiled_step_trains_like_the_eager_step(vit_tiny):
    """One torch.compile over normalisation, forward and loss, traced with its backward by AOTAutograd.

    The ``aot_eager`` backend: the same graph capture as on a GPU, without inductor's
    C++ code generation (a minute on this CPU; bench/train_gpu.py --dry_run has it).
    """
    eager = _stepper("webclip-test-vit")
    batches = _batches(eager.model, 2)
    losses = _train(eager, batches)
    torch._dynamo.reset()
    compiled = _stepper("webclip-test-vit", compile="aot_eager")
    assert _train(compiled, batches) == pytest.approx(losses, rel=1e-5)
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# -- SigLIP ---------------------------------------------------------------------------------------


def test_siglip_loss_equals_open_clips():
    torch.manual_seed(3)
    images = F.normalize(torch.randn(10, 16), dim=-1).requires_grad_(True)
    texts = F.normalize(torch.randn(10, 16), dim=-1).requires_grad_(True)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    ours = siglip_loss(images, texts, scale, bias)
    ours_grads = torch.autograd.grad(ours, (images, texts, scale, bias))
    theirs = open_clip.loss.SigLipLoss()(images, texts, scale, bias)
    theirs_grads = torch.autograd.grad(theirs, (images, texts, scale, bias))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _run(tmp_path, shards_dir, name: str, *extra: str):
    return load_config(None, [
        f"data.train_shards={shards_dir}", "data.eval_tar=null", "data.workers=0", "data.shuffle_buffer=8",
        "model.name=webclip-test-vit", "batch_size=8", "steps=2", "log_every=1", "optim.warmup_steps=1",
        "checkpoint.every_steps=1", "threads=1", "tensorboard=false", f"run_dir={tmp_path / name}", *extra,
    ])  # fmt: skip


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_siglip_run_writes_checkpoints_open_clip_loads(tmp_path, shards_dir, vit_tiny):
    config = _run(tmp_path, shards_dir, "siglip", "loss=siglip")
    train(config)
    path = os.path.join(config.checkpoint_dir, "step_00000002.pt")
    saved = _weights(path)
    assert saved["logit_bias"].item() != -10.0 and saved["logit_scale"].item() != pytest.approx(math.log(10))
    model, _, _ = open_clip.create_model_and_transforms("webclip-test-vit", pretrained=path, init_logit_bias=-10)
    assert torch.equal(model.logit_bias, saved["logit_bias"])
    assert torch.equal(ckpt.load_model(path).model.logit_bias, saved["logit_bias"])
    records = [json.loads(line) for line in open(os.path.join(config.run_dir, "log.jsonl"))]
    assert all(0 <= r["data_wait_share"] <= 1 for r in records if "loss" in r)
    with pytest.raises(ConfigError, match="loss='infonce': choose one of clip, siglip"):
        load_config(None, ["steps=1", "loss=infonce"])


# -- fine-tuning ------------------------------------------------------------------------------------


def test_fine_tuning_from_a_checkpoint_and_an_exported_folder(tmp_path, shards_dir, vit_tiny):
    """A run trains a checkpoint; runs fine-tune from it (file, then hub folder), each with one tower locked."""
    base = _run(tmp_path, shards_dir, "base", "checkpoint.every_steps=0")
    train(base)
    start_path = os.path.join(base.checkpoint_dir, "step_00000002.pt")
    start = _weights(start_path)

    tuned = _run(tmp_path, shards_dir, "lit", f"model.pretrained={start_path}", "model.lock_image=true",
                 "optim.text_lr=5e-4", "seed=7")  # fmt: skip
    train(tuned)
    after = _weights(os.path.join(tuned.checkpoint_dir, "step_00000002.pt"))
    for key, value in start.items():
        frozen = key.startswith("visual.")
        assert torch.equal(after[key], value) == frozen, key  # the locked tower exactly, the rest moved
    state = torch.load(os.path.join(tuned.checkpoint_dir, "step_00000002.state.pt"), weights_only=True)
    lrs = {group.get("lr_scale", 1.0): group["lr"] for group in state["optimizer"]["param_groups"]}
    assert lrs[0.5] == pytest.approx(lrs[1.0] / 2)  # the text tower's own peak, on the same schedule

    resumed = _run(tmp_path, shards_dir, "lit-resumed", f"model.pretrained={start_path}", "model.lock_image=true",
                   "optim.text_lr=5e-4", "seed=7",
                   f"resume={os.path.join(tuned.checkpoint_dir, 'step_00000001.pt')}")  # fmt: skip
    train(resumed)
    for key, value in _weights(os.path.join(resumed.checkpoint_dir, "step_00000002.pt")).items():
        torch.testing.assert_close(value, after[key], rtol=1e-5, atol=1e-6, msg=key)

    from safetensors.torch import save_file

    folder = tmp_path / "exported"
    folder.mkdir()
    save_file(start, str(folder / model_mod.HUB_WEIGHTS))
    (folder / model_mod.HUB_CONFIG).write_text(json.dumps({"model_cfg": VIT_TINY, "preprocess_cfg": {}}))
    text_locked = _run(tmp_path, shards_dir, "locked-text", f"model.pretrained={folder}", "model.lock_text=true",
                       "optim.image_lr=2e-3")  # fmt: skip
    train(text_locked)
    after = _weights(os.path.join(text_locked.checkpoint_dir, "step_00000002.pt"))
    for key, value in start.items():
        frozen = model_mod.tower_of(key) == "text"
        assert torch.equal(after[key], value) == frozen, key

    with pytest.raises(DataError, match="no open_clip_config.json in it"):
        train(_run(tmp_path, shards_dir, "none", f"model.pretrained={tmp_path / 'nowhere'}"))
    with pytest.raises(DataError, match="does not fit the model"):
        train(_run(tmp_path, shards_dir, "misfit", f"model.pretrained={start_path}", "model.name=webclip-tiny"))


@pytest.mark.integration
def test_pretrained_weights_from_s3(tmp_path, vit_tiny, s3_env):
    """A weights file and an exported folder on a real S3 server read as they read locally."""
    from safetensors.torch import save_file

    from core import storage

    torch.manual_seed(4)
    weights = model_mod.create_model("webclip-test-vit").state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / model_mod.HUB_WEIGHTS))
    (tmp_path / model_mod.HUB_CONFIG).write_text(json.dumps({"model_cfg": VIT_TINY}))
    torch.save({"state_dict": weights}, tmp_path / "step_00000001.pt")
    for name in (model_mod.HUB_WEIGHTS, model_mod.HUB_CONFIG, "step_00000001.pt"):
        with storage.atomic_write(f"s3://webclip/pretrained/{name}") as handle:
            handle.write((tmp_path / name).read_bytes())
    for path in ("s3://webclip/pretrained", "s3://webclip/pretrained/step_00000001.pt"):
        model = model_mod.create_model("webclip-test-vit")
        model_mod.load_pretrained(model, path)
        for key, value in model.state_dict().items():
            assert torch.equal(value, weights[key]), (path, key)
    with pytest.raises(DataError, match="no such file"):
        model_mod.pretrained_weights_file("s3://webclip/pretrained/absent.safetensors")
