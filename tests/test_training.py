"""Smoke test of the tiny training loop: a few steps on one fixed batch lower the loss.

No test retrains the shipped model (that is `edgelab train-tiny`, about 40 minutes).
"""
import numpy as np
import torch

from edgelab import models, scenes, training


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = training.TrainConfig(steps=12, batch_images=2, point_prompts=2, box_prompts=1, multi_prompts=1)
    sam = models.build_sam(models.CONFIGS["tiny"]).train()
    opt = torch.optim.AdamW(sam.parameters(), lr=1e-3)
    batch = [scenes.make_scene(s) for s in training.batch_seeds(0, cfg)]
    losses = []
    for _ in range(cfg.steps):
        out = training.train_step(sam, batch, cfg, np.random.default_rng(0))
        opt.zero_grad()
        out["loss_tensor"].backward()
        opt.step()
        losses.append(out["loss"])
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def test_train_tiny_writes_checkpoint_log_and_resumes(tmp_path):
    cfg = training.TrainConfig(steps=2, batch_images=1, point_prompts=1, box_prompts=1, multi_prompts=1,
                               eval_every=2, eval_scenes=1, checkpoint_every=1)
    final = training.train_tiny(tmp_path, cfg, progress=False)
    assert final.is_file() and (tmp_path / "checkpoint.pt").is_file()
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and "miou_point" in log[-1]
    cfg4 = training.TrainConfig(**{**cfg.__dict__, "steps": 3})
    training.train_tiny(tmp_path, cfg4, progress=False)  # resumes at step 2, runs one more
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    sd = torch.load(final, weights_only=True)
    assert set(sd) == set(models.build_shapes("tiny"))


def test_losses_on_known_masks():
    t = torch.zeros(1, 8, 8); t[0, :4] = 1
    perfect = (t * 2 - 1) * 50
    assert training.dice_loss(perfect, t).item() < 1e-3
    assert training.focal_loss(perfect, t).item() < 1e-6
    assert training.mask_iou(perfect, t).item() == 1.0
    assert training.mask_iou(-perfect, t).item() == 0.0
