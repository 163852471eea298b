"""Smoke test of the tiny training loop: a few steps on one fixed batch lower the loss.

No test retrains the shipped model (that is `edgelab train-tiny`, under an hour on 2 cores).
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


def test_dihedral_moves_pixels_and_masks_together():
    s = scenes.make_scene(3, size=64)
    for k in range(8):
        t = training.dihedral(s, k)
        assert t.image.shape == s.image.shape and t.masks.shape == s.masks.shape
        for m, tm in zip(s.masks, t.masks):  # every object keeps its pixel count and its colours
            assert m.sum() == tm.sum()
            assert np.array_equal(np.sort(s.image[m], axis=0), np.sort(t.image[tm], axis=0))
    assert not np.array_equal(training.dihedral(s, 1).masks, s.masks)
    assert np.array_equal(training.dihedral(s, 0).masks, s.masks)


def test_scenes_are_reused_for_scene_reuse_steps():
    cfg = training.TrainConfig(batch_images=3, scene_reuse=2)
    assert training.batch_seeds(0, cfg) == training.batch_seeds(1, cfg) == [0, 1, 2]
    assert training.batch_seeds(2, cfg) == [3, 4, 5]


def test_loss_is_compared_at_loss_size():
    low = torch.zeros(2, 4, 16, 16)
    target = torch.zeros(2, 64, 64); target[:, :32] = 1
    loss, mask_loss, iou_loss = training._prompt_loss(low, torch.zeros(2, 4), target, True, size=32)
    assert torch.isfinite(loss) and mask_loss > 0
