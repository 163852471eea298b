"""Smoke test of the tiny training loop: a few steps on one fixed batch lower the loss.

No test retrains the shipped model (that is `edgelab train-tiny --hours H`, hours on 2 cores).
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgelab import models, scenes, training


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    # SAM's 20:1 focal weight: with 1:1 the loss sits on dice's early plateau for a few hundred steps
    cfg = training.TrainConfig(steps=12, batch_images=2, point_prompts=2, box_prompts=1, multi_prompts=1,
                               focal_weight=20.0)
    sam = models.build_sam(training.tiny_config(cfg)).train()
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
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and len(log) == 3 and "val_point" in log[-1]
    cfg4 = training.TrainConfig(**{**cfg.__dict__, "steps": 3})
    training.train_tiny(tmp_path, cfg4, progress=False)  # resumes at step 2, runs one more
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[3] == {**log[3], "event": "resume", "step": 2} and log[-1]["step"] == 3
    sd = torch.load(final, weights_only=True)
    assert set(sd) == set(model_shapes(cfg))


def model_shapes(cfg: training.TrainConfig) -> set[str]:
    return set(models.build_sam(training.tiny_config(cfg)).state_dict())


def test_hours_budget_ends_the_run_and_resumes_on_the_clock(tmp_path):
    cfg = training.TrainConfig(hours=2 / 3600, batch_images=1, point_prompts=1, box_prompts=1,
                               multi_prompts=1, eval_scenes=1, bf16="off")
    training.train_tiny(tmp_path, cfg, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # the run stops at its first step past the budget; one step can take seconds on a busy machine,
    # so the cap only tells a stop from a run that ignored the budget (its 5000 steps take hours)
    assert 2.0 <= state["train_seconds"] < 60 and state["step"] >= 1
    longer = training.TrainConfig(**{**cfg.__dict__, "hours": 4 / 3600})  # a longer budget resumes
    training.train_tiny(tmp_path, longer, progress=False)
    later = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert later["step"] > state["step"] and later["train_seconds"] >= 4.0


def test_resume_refuses_another_recipe(tmp_path):
    cfg = training.TrainConfig(steps=1, batch_images=1, point_prompts=1, box_prompts=1, multi_prompts=1,
                               eval_scenes=1, bf16="off")
    training.train_tiny(tmp_path, cfg, progress=False)
    other = training.TrainConfig(**{**cfg.__dict__, "steps": 2, "lr": 5e-4})
    with pytest.raises(ValueError, match="another configuration"):
        training.train_tiny(tmp_path, other, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(models.CheckpointError, match="cannot be resumed"):
        training.train_tiny(tmp_path, cfg, progress=False)


def test_step_seconds_counts_what_training_was_given():
    assert training.step_seconds(wall=1.0, cpu=2.0, threads=2) == 1.0  # alone on two cores
    assert training.step_seconds(wall=2.0, cpu=2.0, threads=2) == 1.0  # sharing them with another job
    assert training.step_seconds(wall=1.0, cpu=0.3, threads=0) == 0.3
    # a GPU step's CPU time over 16 threads would count a sixteenth of it; workers' time is not ours
    assert training.step_seconds(wall=1.0, cpu=1.0, threads=16, device="cuda") == 1.0
    assert training.step_seconds(wall=1.0, cpu=0.2, threads=2, workers=4) == 1.0


def test_workers_draw_the_batches_of_the_loop():
    """Worker processes prepare the same steps as the loop would, from a step inside a block of
    shared scenes (a resume) on; a run with workers logs the same losses."""
    cfg = training.TrainConfig(batch_images=2)
    alone = training.step_batches(3, cfg)
    forked = training.step_batches(3, training.TrainConfig(**{**cfg.__dict__, "workers": 2}))
    try:
        for _ in range(4):
            a, b = next(alone), next(forked)
            assert a.step == b.step and all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
            for kind in a.groups:
                assert all(np.array_equal(x, y) for x, y in zip(a.groups[kind], b.groups[kind]) if x is not None)
    finally:
        forked.close()
    assert [s.step for s in training.prepare_steps(range(3, 5), cfg)] == [3, 4]


def test_a_run_with_workers_logs_the_same_losses(tmp_path):
    cfg = training.TrainConfig(steps=3, batch_images=1, point_prompts=1, box_prompts=1, multi_prompts=1,
                               eval_scenes=1, checkpoint_every=3, bf16="off")
    losses = []
    for workers in (0, 1):
        run = tmp_path / str(workers)
        training.train_tiny(run, training.TrainConfig(**{**cfg.__dict__, "workers": workers}), progress=False)
        losses.append([r["loss"] for r in training.log_records(run)])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_packed_masks_cross_to_the_model_intact():
    masks = np.random.default_rng(0).random((3, 5, 13)) > 0.5  # a width that is no multiple of 8
    unpacked = training.unpack_masks(torch.from_numpy(np.packbits(masks, axis=-1)), 13)
    assert torch.equal(unpacked, torch.from_numpy(masks).float())


def test_lr_follows_the_clock_with_hours():
    cfg = training.TrainConfig(hours=1.0, warmup=10, lr=1e-3)
    assert training._lr_at(5, cfg, 0.0) == pytest.approx(6e-4)
    assert training._lr_at(500, cfg, 1800.0) == pytest.approx(5e-4)
    assert training._lr_at(900, cfg, 3600.0) == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_is_every_loops_schedule():
    assert training.warmup_cosine(0, 1e-3, 10, 110) == pytest.approx(1e-4)  # warm-up: (step + 1) / warmup
    assert training.warmup_cosine(60, 1e-3, 10, 110) == pytest.approx(5e-4)  # half way through the cosine
    assert training.warmup_cosine(500, 1e-3, 10, 110) == pytest.approx(0.0, abs=1e-12)  # past the end: 0
    assert training.warmup_cosine(3, 1e-3, 0, 12) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    from edgelab import distillation
    cfg = distillation.DistillConfig(steps=100, warmup=10, lr=2e-3)
    assert [distillation._lr_at(s, cfg) for s in (0, 50, 99)] == [training.warmup_cosine(s, 2e-3, 10, 100) for s in (0, 50, 99)]


def test_stem_keeps_the_token_grid_and_predictor():
    cfg = training.TrainConfig()
    sam = models.build_sam(training.tiny_config(cfg))
    with torch.no_grad():
        emb = sam.image_encoder(torch.zeros(1, 3, 256, 256))
    assert emb.shape == (1, 128, 16, 16)
    assert sam.image_encoder.patch_embed.proj.stride == (4, 4)
    with pytest.raises(ValueError, match="does not divide"):
        models.build_sam(models.replace(models.CONFIGS["tiny"], stem=(8, 8, 8, 8, 8)))


def test_bf16_choice():
    assert training.use_bf16(training.TrainConfig(bf16="off"), "cpu") is False
    assert training.use_bf16(training.TrainConfig(bf16="on"), "cpu") is True
    assert training.use_bf16(training.TrainConfig(), "cpu") == training.cpu_has_bf16()
    with pytest.raises(ValueError, match="bf16"):
        training.use_bf16(training.TrainConfig(bf16="maybe"), "cpu")


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


def test_the_trained_architecture_is_tiny(tmp_path):
    assert training.tiny_config(training.TrainConfig()) == models.CONFIGS["tiny"]
    cfg = training.TrainConfig(steps=1, batch_images=1, point_prompts=1, box_prompts=1, multi_prompts=1,
                               eval_scenes=1, bf16="off")
    training.train_tiny(tmp_path, cfg, progress=False)
    model = models.load_sam("tiny", checkpoint=tmp_path / "checkpoint.pt")  # the training checkpoint loads
    assert model.edgelab.weights_kind == "checkpoint"


def test_learning_curve_drops_what_a_resume_superseded(tmp_path):
    lines = [{"event": "start"}, {"step": 10, "train_s": 360.0, "val_point": 0.1, "val_box": 0.2},
             {"step": 20, "train_s": 720.0, "val_point": 0.3, "val_box": 0.4},  # after the checkpoint at 10
             {"event": "resume", "step": 10, "train_s": 360.0},
             {"step": 20, "train_s": 700.0, "val_point": 0.35, "val_box": 0.45}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    curve = training.learning_curve(tmp_path)
    assert [(c["step"], c["val_point"]) for c in curve] == [(10, 0.1), (20, 0.35)]
    assert curve[0]["hours"] == pytest.approx(0.1)


def test_second_phase_starts_from_the_given_weights_on_new_scenes(tmp_path):
    """--init warm-starts a phase from earlier weights; --scene-offset draws scenes phase one never saw."""
    cfg = training.TrainConfig(steps=1, batch_images=1, point_prompts=1, box_prompts=1, multi_prompts=1,
                               eval_scenes=1, lr=1e-9, warmup=0, bf16="off", init=str(models.TINY_WEIGHTS),
                               scene_offset=1_000_000)
    final = training.train_tiny(tmp_path, cfg, progress=False)
    start = torch.load(models.TINY_WEIGHTS, weights_only=True)
    after = torch.load(final, weights_only=True)
    assert all(torch.allclose(after[k].float(), start[k].float(), atol=1e-5) for k in start)  # lr 1e-9: barely moved
    assert training.SceneBatches(cfg, offset=cfg.scene_offset)(0, np.random.default_rng(0))[0].seed == 1_000_000


def test_a_third_phase_trains_the_decoder_only(tmp_path):
    """--freeze-encoder keeps the image encoder of --init bit for bit and moves the decoder."""
    cfg = training.TrainConfig(steps=1, batch_images=1, point_prompts=1, box_prompts=1, multi_prompts=1,
                               eval_scenes=1, lr=1e-3, warmup=0, bf16="off", init=str(models.TINY_WEIGHTS),
                               freeze_encoder=True, iou_weight=4.0)
    after = torch.load(training.train_tiny(tmp_path, cfg, progress=False), weights_only=True)
    start = torch.load(models.TINY_WEIGHTS, weights_only=True)
    assert all(torch.equal(after[k], start[k]) for k in start if k.startswith("image_encoder."))
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("mask_decoder."))


def test_iou_weight_scales_the_iou_heads_loss():
    torch.manual_seed(0)
    low, iou = torch.randn(3, 4, 16, 16), torch.rand(3, 4)
    target = (torch.rand(3, 32, 32) > 0.5).float()
    one = training._prompt_loss(low, iou, target, multimask=True, size=32)
    four = training._prompt_loss(low, iou, target, multimask=True, size=32, iou_weight=4.0)
    assert torch.allclose(four[0], one[1] + 4 * one[2])


def test_box_noise_sets_how_far_training_boxes_move():
    mask = np.zeros((256, 256), bool)
    mask[100:150, 60:200] = True
    exact = training._noisy_box(mask, np.random.default_rng(0), 256, noise=0.0)
    assert exact == [60.0, 100.0, 199.0, 149.0]
    moves = [np.abs(np.subtract(training._noisy_box(mask, np.random.default_rng(i), 256, noise=0.04), exact)).max()
             for i in range(50)]
    assert 0 < max(moves) <= 8.0  # at most 200 x noise pixels


def test_cli_refuses_a_bad_second_phase(tmp_path):
    from conftest import run_cli
    code, _, err = run_cli("train-tiny", "--out", str(tmp_path), "--box-noise", "2")
    assert code == 2 and "--box-noise" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("train-tiny", "--out", str(tmp_path), "--init", str(tmp_path / "missing.pt"))
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("train-tiny", "--out", str(tmp_path), "--freeze-encoder")
    assert code == 2 and "--init" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("train-tiny", "--out", str(tmp_path), "--iou-weight", "-1")
    assert code == 2 and "--iou-weight" in err and len(err.strip().splitlines()) == 1


def test_append_phase_counts_on_from_the_first_log(tmp_path):
    first = [{"event": "start"}, {"step": 10, "train_s": 3600.0, "val_point": 0.5, "val_box": 0.6}]
    (tmp_path / "first.jsonl").write_text("\n".join(json.dumps(x) for x in first) + "\n")
    phase = tmp_path / "phase"
    phase.mkdir()
    (phase / "config.json").write_text(json.dumps({"init": "data/sam_tiny.pt", "hours": 1.0}))
    second = [{"event": "start", "hours": 1.0}, {"step": 5, "train_s": 1800.0, "val_point": 0.55, "val_box": 0.65},
              {"step": 8, "train_s": 2900.0},  # lost: the run was killed after its checkpoint at 5
              {"event": "resume", "step": 5, "train_s": 1800.0},
              {"step": 10, "train_s": 3600.0, "val_point": 0.6, "val_box": 0.7}]
    (phase / "log.jsonl").write_text("\n".join(json.dumps(x) for x in second) + "\n")
    out = training.append_phase(tmp_path / "first.jsonl", phase, tmp_path / "joined.jsonl")
    curve = training.learning_curve(out)
    assert [(c["step"], c["hours"], c["val_point"]) for c in curve] == [(10, 1.0, 0.5), (15, 1.5, 0.55), (20, 2.0, 0.6)]
    events = [json.loads(x) for x in out.read_text().splitlines() if "event" in x]
    assert events[1] == {**events[1], "event": "phase", "step": 10, "train_s": 3600.0}
    assert events[1]["config"]["init"] == "data/sam_tiny.pt"
    assert training.phase_starts(out) == [{"step": 10, "hours": 1.0, "config": events[1]["config"]}]
    assert training.phase_starts(tmp_path / "first.jsonl") == []


def test_tuning_the_iou_head_moves_only_the_iou_head(tmp_path):
    """tune-iou-head: samples with four true IoUs each, a fit, every other weight unchanged."""
    log = training.tune_iou_head(models.TINY_WEIGHTS, tmp_path, n_scenes=2, steps=20, val_scenes=2, progress=False)
    assert log["samples"] > 0 and log["last_loss"] < log["first_loss"] * 2
    after = torch.load(tmp_path / "sam_tiny.pt", weights_only=True)
    start = torch.load(models.TINY_WEIGHTS, weights_only=True)
    moved = {k for k in start if not torch.equal(after[k], start[k])}
    assert moved and all(k.startswith("mask_decoder.iou_prediction_head.") for k in moved)
    x, y = training.iou_head_samples(models.load_sam("tiny"), [5], progress=False)
    assert x.shape[0] == y.shape[0] == 3 * len(scenes.make_scene(5).masks) and y.shape[1] == 4
    assert ((y >= 0) & (y <= 1)).all()


def test_cli_refuses_a_bad_iou_head_run(tmp_path):
    from conftest import run_cli
    code, _, err = run_cli("tune-iou-head", "--out", str(tmp_path), "--scenes", "0")
    assert code == 2 and "--scenes" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("tune-iou-head", "--out", str(tmp_path), "--init", str(tmp_path / "missing.pt"))
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_save_atomic_keeps_the_last_checkpoint_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    training.save_atomic({"step": 1}, path)

    def killed(obj, f):  # a process killed mid-write: part of the file, then nothing
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        training.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_workers_exit_when_the_training_process_is_killed(tmp_path):
    """kill -9 skips step_batches' shutdown; the workers notice their parent is gone and exit."""
    import signal
    import subprocess
    import sys
    import time
    script = tmp_path / "trainer.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from edgelab import training\n"
        "it = training.step_batches(0, training.TrainConfig(batch_images=1, workers=2))\n"
        "next(it)\n"
        "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "time.sleep(120)\n")
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in trainer.stdout.readline().split()]
    assert len(workers) == 2
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()

    def alive(pid: int) -> bool:  # a zombie (exited, not yet reaped by whoever adopted it) is gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False
    deadline = time.time() + 15
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers)


def test_the_budget_bar_survives_a_last_step_past_the_budget(capsys):
    """The last step of an hours run ends past the budget; the bar stops at it instead of failing
    (a 75-minute run lost its final weights to tqdm's format error)."""
    bar = training._progress_bar(budget=10.0, seconds=8.0, start=5, end=10 ** 9, progress=True)
    training._advance(bar, 3.5, 10.0)
    assert bar.n == 10.0 and "10/10 s" in str(bar)
    bar.close()
