"""edgelab.distillation: students, the loss, decoupled training, saving, DDP, the CLI verbs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from edgelab import bench, checks, distillation as D, models


@pytest.fixture(scope="module")
def teacher():
    return models.load_sam("tiny")


@pytest.fixture(scope="module")
def small_pool(teacher):
    return D.build_pool(teacher, 16, progress=False)


@pytest.fixture(scope="module")
def trained(teacher, small_pool, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill")
    cfg = D.DistillConfig(student="resnet18", steps=40, batch_images=8, pool_scenes=16, lr=3e-3,
                          eval_scenes=2, checkpoint_every=20)
    sam = D.train_student(teacher, run, cfg, pool=small_pool, progress=False)
    return run, sam


@pytest.mark.parametrize("kind", list(D.STUDENTS))
def test_every_student_gives_the_teachers_embedding_shape(teacher, kind):
    sam = D.make_student(teacher, kind)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert sam.image_encoder(x).shape == teacher.image_encoder(x).shape == (2, 128, 16, 16)
    assert models.count_params(sam.image_encoder) < models.count_params(teacher.image_encoder)
    assert bench.encoder_macs(sam) < bench.encoder_macs(teacher)


def test_stride_8_student_reads_a_2x2_average_of_the_image(teacher):
    enc = D.make_student(teacher, "mobilenet_v3").image_encoder
    x = torch.randn(1, 3, 256, 256)
    seen = {}
    enc.trunk.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
    with torch.no_grad():
        enc(x)
    assert torch.allclose(seen["x"], F.avg_pool2d(x, 2), atol=1e-6)


def test_unknown_student_and_loss_are_clear_errors(teacher):
    with pytest.raises(ValueError, match="unknown student 'vgg'"):
        D.make_student(teacher, "vgg")
    with pytest.raises(ValueError, match="unknown loss"):
        D.embedding_loss(torch.zeros(2), torch.zeros(2), "hinge")
    with pytest.raises(ValueError, match="pool_scenes"):
        D.DistillConfig(pool_scenes=4, batch_images=8).check()


def test_huber_is_quadratic_inside_delta_and_linear_outside():
    s, t = torch.tensor([0.5, -3.0]), torch.zeros(2)
    want = (0.5 * 0.5 ** 2 + 1.0 * (3.0 - 0.5)) / 2
    assert D.embedding_loss(s, t, "huber", delta=1.0).item() == pytest.approx(want)
    assert D.embedding_loss(s, t, "mse").item() == pytest.approx((0.25 + 9) / 2)
    assert D.embedding_loss(s, t, "l1").item() == pytest.approx(1.75)


def test_pool_holds_images_and_teacher_embeddings(teacher, small_pool):
    assert len(small_pool) == 16
    assert small_pool.images.dtype == torch.uint8 and small_pool.images.shape == (16, 3, 256, 256)
    x, target = small_pool.batch(torch.tensor([3]), teacher)
    with torch.no_grad():
        assert torch.allclose(teacher.image_encoder(x), target, atol=2e-2)  # stored as float16


def test_training_lowers_the_loss_and_writes_its_run_folder(trained):
    run, sam = trained
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first
    assert 0.0 <= log[-1]["miou_point"] <= 1.0
    assert (run / "student.pt").is_file() and (run / "checkpoint.pt").is_file()
    assert all(not p.requires_grad for p in sam.mask_decoder.parameters())


def test_resume_continues_from_the_checkpoint(teacher, small_pool, trained, tmp_path):
    run, _ = trained
    for name in ("checkpoint.pt", "log.jsonl"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    cfg = D.DistillConfig(student="resnet18", steps=45, batch_images=8, pool_scenes=16, eval_scenes=1)
    D.train_student(teacher, tmp_path, cfg, pool=small_pool, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 46))


def test_saved_student_reloads_exactly_and_plugs_into_sam_predictor(teacher, trained):
    run, sam = trained
    again = D.load_student(run / "student.pt", teacher)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(again.image_encoder(x), sam.image_encoder(x))
    from segment_anything import SamPredictor
    import numpy as np
    p = SamPredictor(again)
    p.set_image(np.zeros((40, 50, 3), np.uint8))
    masks, _, _ = p.predict(point_coords=np.array([[5.0, 5.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 40, 50)


def test_deployable_student_gives_the_same_embedding(teacher, trained):
    _, sam = trained
    fast = D.deployable(sam)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.image_encoder.modules())
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(fast.image_encoder(x), sam.image_encoder(x), atol=1e-4)


def test_deployable_says_when_it_cannot_fold(trained, monkeypatch):
    _, sam = trained
    import torch.fx.experimental.optimization as fx_opt

    def untraceable(module):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(fx_opt, "fuse", untraceable)
    with pytest.warns(UserWarning, match="BatchNorms left unfolded.*data-dependent control flow"):
        fast = D.deployable(sam)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.image_encoder.modules())  # kept, not lost
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(fast.image_encoder(x), sam.image_encoder(x), atol=1e-4)


def test_bad_student_files_are_one_clear_error(teacher, tmp_path, tiny_checkpoint):
    with pytest.raises(models.CheckpointError, match="not found"):
        D.load_student(tmp_path / "nope.pt", teacher)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(models.CheckpointError, match="not a loadable"):
        D.load_student(tmp_path / "junk.pt", teacher)
    with pytest.raises(models.CheckpointError, match="not a student saved by edgelab"):
        D.load_student(tiny_checkpoint, teacher)


def test_two_torchrun_ranks_end_with_the_same_weights(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "edgelab", "distill", "--out", str(out), "--steps", "4", "--pool-scenes", "8",
           "--batch-images", "2", "--eval-scenes", "1", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(ranks["rank_digests"]) == 2
    assert ranks["ranks_agree"] and ranks["rank_digests"][0] == ranks["rank_digests"][1]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")] == [ranks]  # rank 0 only


def test_cli_bench_distill_reports_teacher_and_students(trained):
    run, _ = trained
    code, out, err = run_cli("bench", "distill", "--student", str(run / "student.pt"), "--scenes", "2",
                             "--repeats", "3", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["reference"] == "teacher" and rec["weights"] == "trained"
    names = [v["name"] for v in rec["variants"]]
    assert names[0] == "teacher" and len(names) == 3 and names[2].endswith("deployable")
    for v in rec["variants"]:
        assert set(v) == {"name", "params", "macs", "median_s", "miou", "agreement"}
    assert rec["variants"][0]["agreement"] == 1.0


def test_prompt_loss_reaches_the_student_through_the_frozen_decoder(teacher, small_pool):
    """Prompt-in-the-loop: the teacher's own embedding scores lowest; a perturbed one gets a
    gradient; the decoder's weights get none."""
    sam = D.make_student(teacher, "resnet18")
    _, target = small_pool.batch(torch.arange(2), teacher)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731  the same prompts for each call
    student = (target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    exact = D.prompt_loss(sam, target.clone(), target, 4, gen())
    off = D.prompt_loss(sam, student, target, 4, gen())
    off.backward()
    assert off > exact and student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.mask_decoder.parameters())


def test_training_with_the_prompt_loss_runs_and_logs(teacher, small_pool, tmp_path):
    cfg = D.DistillConfig(student="resnet18", steps=3, batch_images=2, pool_scenes=16, eval_scenes=1,
                          prompt_weight=1.0, prompt_points=2)
    D.train_student(teacher, tmp_path, cfg, pool=small_pool, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["prompt_weight"] == 1.0


def test_task_loss_scores_the_exact_masks_through_the_frozen_decoder(teacher, small_pool):
    """The task loss: the teacher's embedding (a trained encoder) scores far lower than noise; the
    gradient reaches the embedding, the decoder's weights get none."""
    import numpy as np
    sam = D.make_student(teacher, "resnet18")
    seeds = small_pool.seeds[:2]
    _, target = small_pool.batch(torch.arange(2), teacher)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    good = D.task_loss(sam, target, seeds, np.random.default_rng(0))
    bad = D.task_loss(sam, noise, seeds, np.random.default_rng(0))
    bad.backward()
    assert torch.isfinite(good) and good < 0.8 * bad
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.mask_decoder.parameters())


def test_training_with_the_task_loss_runs_and_logs(teacher, small_pool, tmp_path):
    cfg = D.DistillConfig(student="resnet18", steps=2, batch_images=2, pool_scenes=16, eval_scenes=1,
                          task_weight=0.1)
    D.train_student(teacher, tmp_path, cfg, pool=small_pool, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "miou_point" in log[-1]
    assert json.loads((tmp_path / "config.json").read_text())["task_weight"] == 0.1


@pytest.mark.parametrize("args, message", [
    (["distill", "--steps", "0"], "steps"),
    (["distill", "--prompt-weight", "-1"], "--prompt-weight"),
    (["distill", "--task-weight", "-1"], "--task-weight"),
    (["distill", "--batch-images", "8", "--pool-scenes", "4"], "pool_scenes at least batch_images"),
    (["bench", "distill", "--student", "/no/such/student.pt"], "not found"),
])
def test_cli_distill_bad_input_is_one_line(args, message):
    code, out, err = run_cli(*args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_huber_check():
    checks.check_huber_loss(lambda s, t, d: F.huber_loss(s, t, delta=d))
    with pytest.raises(checks.ExerciseError, match="half the MSE"):
        checks.check_huber_loss(lambda s, t, d: F.mse_loss(s, t) / 2)
    with pytest.raises(checks.ExerciseError, match="not implemented"):
        checks.check_huber_loss(lambda s, t, d: (_ for _ in ()).throw(NotImplementedError))


def test_wire_student_check():
    checks.check_wire_student(D.student_sam)

    def not_frozen(teacher, encoder):
        from segment_anything.modeling import Sam
        return Sam(encoder, teacher.prompt_encoder, teacher.mask_decoder,
                   teacher.pixel_mean.flatten().tolist(), teacher.pixel_std.flatten().tolist())
    with pytest.raises(checks.ExerciseError, match="still be trained"):
        checks.check_wire_student(not_frozen)
    with pytest.raises(checks.ExerciseError, match="not the student"):
        checks.check_wire_student(lambda t, e: t)


def test_resnet18_stems_land_on_the_same_grid(teacher):
    x = torch.randn(1, 3, 256, 256)
    strided, chans, stride = D.resnet18_trunk(stem="strided")
    resnet, chans2, stride2 = D.resnet18_trunk(stem="resnet")
    assert (chans, stride, chans2, stride2) == (64, 16, 64, 8)
    with torch.no_grad():
        assert strided.eval()(x).shape == resnet.eval()(F.avg_pool2d(x, 2)).shape == (1, 64, 16, 16)
    assert D.make_student(teacher, "resnet18").image_encoder.input_size == 256  # no resampling
    with pytest.raises(ValueError, match="unknown stem"):
        D.resnet18_trunk(stem="vit")


def test_students_reading_follows_the_numbers():
    teacher = {"name": "teacher", "median_s": 0.016, "miou": 0.80, "agreement": 1.0}
    fast = {"name": "fast", "median_s": 0.004, "miou": 0.40, "agreement": 0.45}
    good = {"name": "good", "median_s": 0.005, "miou": 0.76, "agreement": 0.70}
    text = D.students_reading([teacher, fast, good])
    assert text.startswith("Per millisecond of encoder time, good keeps the most of the teacher's mIoU: 95% of it")
    assert "3.20x faster than the teacher's encoder" in text and "No student is more accurate than it." in text
    assert text.endswith("below the mIoU against the ground truth for good.")
    slow = {"name": "slow", "median_s": 0.032, "miou": 0.79, "agreement": 0.9}
    text = D.students_reading([teacher, fast, slow])  # 50% in 4 ms beats 99% in 32 ms
    assert "fast keeps the most" in text and "4.00x faster than" in text
    assert "The most accurate student is slow (99% of the teacher's mIoU, 2.00x slower than the teacher)." in text
    assert text.endswith("Every student agrees with the teacher's masks at least as well as with the ground truth.")
    with pytest.raises(ValueError, match="teacher"):
        D.students_reading([fast, good])



def test_a_checkpoint_that_cannot_be_resumed_is_one_clear_error(teacher, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"half a checkpoint")  # a run killed mid-write, before atomic saves
    cfg = D.DistillConfig(steps=1, batch_images=2, pool_scenes=2, eval_scenes=1)
    with pytest.raises(models.CheckpointError, match="cannot be resumed.*--fresh"):
        D.train_student(teacher, tmp_path, cfg, progress=False)
    code, _, err = run_cli("distill", "--out", str(tmp_path), "--steps", "1", "--pool-scenes", "2",
                           "--batch-images", "2", "--json")
    assert code == 2 and "cannot be resumed" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"half a checkpoint"  # nothing lost
