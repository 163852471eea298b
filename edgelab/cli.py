"""`edgelab <verb>`: drive the workbook without Jupyter (the guide's command-line contract).

Verbs: eval, bench encoder|prune|quant|distill|deploy|everything|machine, distill, train-tiny, tune-iou-head, run,
sweep, report, student, grade. `--json` prints one JSON object on stdout. `python -m edgelab` is the same
command (torchrun starts `-m edgelab distill` on every rank).
Bad input exits 2 with one line on stderr, never a traceback: ranges are the parser's (`count`, `real`),
what depends on several arguments or on files is each verb's.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NoReturn

PROG = "edgelab"


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with the contract's error: one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: a whole number in [low, high] (range checks live in the parser, once)."""
    wanted = (f"in [{low}, {high}]" if high is not None else "a positive number" if low == 1 else f"{low} or more")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {value}")
        return value
    return parse


def real(low: float, high: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a number in [low, high], or in (low, high] when `above`."""
    wanted = (f"in {'(' if above else '['}{low:g}, {high:g}]" if high < math.inf
              else f"more than {low:g}" if above else f"{low:g} or more")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        if not (low < value if above else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value
    return parse


def device(text: str) -> str:
    """An argparse `type`: a torch device this machine has (`models.check_device`)."""
    if text == "cpu":  # the default: no torch import for every parse
        return text
    from .models import check_device
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load(args):
    from . import models  # load_sam itself refuses contradictory weights/checkpoint arguments
    return models.load_sam(args.model, checkpoint=args.checkpoint, weights=args.weights, device=args.device)


def _load_sized(args):
    """`_load`, or with --image-size a random-weights model built for that input size."""
    if args.image_size is None:
        return _load(args)
    if args.weights != "random":
        raise UsageError("--image-size changes the architecture (position embeddings): use it with --weights random")
    from . import models
    return models.load_sam(args.model, weights="random", device=args.device, img_size=args.image_size)


def cmd_eval(args) -> dict:
    from . import evaluate, models
    model = _load(args)
    kind = models.weights_label(model)
    if args.images:
        if not args.reference:
            raise UsageError("--images needs --reference NAME (agreement with a reference model's masks)")
        ref = models.load_sam(args.reference, checkpoint=args.reference_checkpoint,
                              device=args.device)
        imgs = [img for _, img in evaluate.image_folder(args.images)]
        res = evaluate.agreement(model, ref, imgs, progress=not args.json)
        out = {"model": args.model, "weights": kind, "reference": args.reference,
               "agreement": res.miou, "miou": res.miou, "n_masks": res.n_masks, "n_images": res.n_images}
    else:
        seeds = None
        if args.seed is not None:
            seeds = [args.seed + i for i in range(args.scenes or 50)]
        res = evaluate.evaluate_scenes(model, args.scenes, args.prompt, seeds=seeds, progress=not args.json,
                                       split=args.split)
        out = {"model": args.model, "weights": kind, "checksum": model.edgelab.checksum,
               "split": args.split if seeds is None else f"seeds {args.seed}..{args.seed + len(seeds) - 1}",
               **res.as_dict()}
    if kind == "random":
        out["note"] = "random weights: timing only, this mIoU says nothing about accuracy"
    return out


def cmd_bench_encoder(args) -> dict:
    """Image encoder and mask decoder latency of one model (random weights only when asked)."""
    from . import attention, bench
    variants = None
    if args.attention is not None:
        try:
            variants = attention.parse_variants(args.attention)
        except ValueError as e:
            raise UsageError(f"--attention: {e}") from None
    model = _load_sized(args)
    if variants is not None:
        setup = {"name": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                 "weights": args.weights, "device": args.device, "img_size": args.image_size}
        return attention.attention_study(model, variants, batch=args.batch, repeats=args.repeats,
                                         seed=args.seed, memory_setup=None if args.no_memory else setup)
    return bench.encoder_decoder(model, batch=args.batch, prompts=args.prompts, repeats=args.repeats)


def _ratios(text: str) -> list[float]:
    """'0.2,0.4,0.6' -> [0.2, 0.4, 0.6]; each a fraction in (0, 1)."""
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated fractions like 0.2,0.4,0.6, not {text!r}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"--ratios must be fractions between 0 and 1 (exclusive), got {text!r}")
    return ratios


def cmd_bench_prune(args) -> dict:
    """`bench prune`: one uniformly pruned variant per ratio plus `unpruned` (notebook 02's table)."""
    from . import models, pruning
    ratios = _ratios(args.ratios)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(pruning.KINDS):
        raise UsageError(f"--kinds must name some of {','.join(pruning.KINDS)}, not {args.kinds!r}")
    model = _load_sized(args)
    kind = models.weights_label(model)
    if kind == "random" and args.finetune_steps:
        raise UsageError("--finetune-steps needs trained weights or a checkpoint (random weights: timing only)")
    return pruning.bench_prune(model, ratios, kinds, args.finetune_steps, args.scenes, args.repeats,
                               progress=not args.json)


def cmd_bench_quant(args) -> dict:
    """`bench quant`: FP32 / BF16 / INT8 variants of one model in one run (notebook 03's Table 2)."""
    from . import attention, models, quantization
    try:
        names = quantization.parse_variants(args.variants)
        att = attention.parse_variants(args.attention)[0] if args.attention else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = _load_sized(args)
    kind = models.weights_label(model)
    if kind == "random":  # SAM zero-initialises the tables: make the bias path count in the errors
        models.randomize_rel_pos(model, seed=0)
    prepare = None if att in (None, "reference") else (lambda m: attention.set_attention(m, att))
    return quantization.bench_quant(model, names, args.scenes, args.repeats, prepare, att or "reference",
                                    progress=not args.json)


def cmd_bench_distill(args) -> dict:
    """`bench distill`: the teacher and each shipped student (notebook 04's students table)."""
    from . import distillation, models
    teacher = models.load_sam("tiny", device=args.device)
    students = {}
    for path in args.student or [distillation.SHIPPED]:
        sam = (distillation.load_shipped_student(teacher) if path == distillation.SHIPPED
               else distillation.load_student(path, teacher))
        name = sam.edgelab.name
        if name in students:  # two files of the same family: tell them apart by file
            name = f"{name} ({Path(path).name})"
        students[name] = sam
        students[name + " deployable"] = distillation.deployable(sam)
    return distillation.bench_distill(teacher, students, args.scenes, args.repeats, progress=not args.json)


def cmd_bench_everything(args) -> dict:
    """`bench everything`: SAM's automatic mask generator on tiny and its faster variants (chapter 05)."""
    from dataclasses import replace

    from . import attention, distillation, everything, models, quantization, scenes
    cfg = everything.EverythingConfig(points_per_side=args.points_per_side)
    tiny = models.load_sam("tiny", device=args.device)
    student = distillation.deployable(distillation.load_shipped_student(models.load_sam("tiny")))
    fast = replace(cfg, fast=True)
    c2f = replace(fast, skip_covered=True)
    variants = {"pytorch fp32": tiny,
                "sdpa attention": attention.set_attention(models.load_sam("tiny", device=args.device), "sdpa"),
                "w8a8": quantization.make_variant(models.load_sam("tiny", device=args.device), "w8a8")[0],
                "student": student,
                "fast decoder": (tiny, fast),
                "fast decoder, one batch": (tiny, replace(fast, points_per_batch=args.points_per_side ** 2)),
                "fast decoder, coarse to fine": (tiny, c2f),
                "student, fast, coarse to fine": (student, c2f)}
    seeds = scenes.split_seeds(args.split, args.scenes)
    with tempfile.TemporaryDirectory(prefix="edgelab-everything-") as tmp:
        for rt in ("onnxruntime", "openvino"):  # the deployable ones: encoder and grid decoder on an edge runtime
            model, decode = everything.runtime_model(models.load_sam("tiny"), tmp, rt)
            variants[f"{rt}, fast, coarse to fine"] = (model, c2f, decode)
        return everything.bench_everything(variants, seeds, cfg, progress=not args.json)


def cmd_bench_machine(args) -> dict:
    """`bench machine`: this machine's GEMM rates (fp32, bf16, int8) and memory bandwidth."""
    from . import roofline
    return roofline.machine_record(n=args.n, mb=args.mb, repeats=args.repeats)


def cmd_bench_deploy(args) -> dict:
    """`bench deploy`: every stack step and ONNX Runtime variant of tiny in one run (notebook 05)."""
    from . import deploy
    cfg = deploy.StackConfig(attention=args.attention, prune_ratio=args.prune_ratio,
                             finetune_steps=args.finetune_steps, prompts=args.prompts)
    cfg.check()
    return deploy.bench_deploy(args.out, cfg, n_eval=args.scenes, repeats=args.repeats,
                               memory=not args.no_memory, progress=not args.json)


def cmd_distill(args) -> dict | None:
    """`distill`: train one student; under `torchrun -m edgelab distill` every rank runs this, rank 0 reports."""
    from . import distillation
    cfg = distillation.profile_config(
        args.profile, student=args.student, steps=args.steps, pool_scenes=args.pool_scenes,
        batch_images=args.batch_images, lr=args.lr, loss=args.loss, seed=args.seed, eval_scenes=args.eval_scenes,
        init=args.init, prompt_weight=args.prompt_weight, prompt_points=args.prompt_points,
        task_weight=args.task_weight)
    return distillation.run(cfg, args.out, fresh=args.fresh, progress=not (args.json or args.no_progress))


def cmd_train_tiny(args) -> dict:
    from . import models, training
    cfg = training.TrainConfig(steps=args.steps or training.TrainConfig.steps, seed=args.seed,
                               hours=args.hours, threads=args.threads, eval_scenes=args.eval_scenes,
                               checkpoint_minutes=args.checkpoint_minutes, lr=args.lr, warmup=args.warmup,
                               box_noise=args.box_noise, scene_offset=args.scene_offset,
                               init=str(args.init) if args.init else None, box_prompts=args.box_prompts,
                               freeze_encoder=args.freeze_encoder, iou_weight=args.iou_weight,
                               batch_images=args.batch_images, workers=args.workers)
    if args.freeze_encoder and not args.init:
        raise UsageError("--freeze-encoder trains the decoder of trained weights: give them with --init")
    if args.init:
        models.read_checkpoint(args.init, "tiny")  # one clear line now rather than after the set-up
    final = training.train_tiny(args.out, cfg, device=args.device, resume=not args.fresh,
                                stop_after=args.stop_after, progress=not args.json)
    sha = models.sha256_of(final)
    return {"weights": str(final), "sha256": sha, "steps": cfg.steps, "hours": cfg.hours,
            "stop_after": args.stop_after,
            "shipped_sha256": models.TINY_SHA256.read_text().split()[0] if models.TINY_SHA256.exists() else None}


def cmd_tune_iou_head(args) -> dict:
    """`tune-iou-head`: refit only the IoU head of tiny weights (notebook 00, the IoU head's choice)."""
    from . import models, training
    models.read_checkpoint(args.init, "tiny")  # one clear line now rather than after the set-up
    log = training.tune_iou_head(args.init, args.out, n_scenes=args.scenes, scene_offset=args.scene_offset,
                                 steps=args.steps, lr=args.lr, threads=args.threads, progress=not args.json)
    final = Path(args.out) / "sam_tiny.pt"
    return {"weights": str(final), "sha256": models.sha256_of(final), **log}


def training_default(name: str):
    from . import training
    return getattr(training.TrainConfig, name)


def cmd_run(args) -> dict:
    from . import runner
    return runner.run_notebooks(out=args.out, profile=args.profile, only=args.only,
                                params=dict(args.param or []))


def _grid(params: list[list[str]] | None) -> dict[str, list[str]]:
    grid = {}
    for name, *values in params or []:
        if not values:
            raise UsageError(f"-p {name} needs at least one value")
        grid[name] = values
    return grid


def cmd_sweep(args) -> dict:
    from . import runner
    return runner.sweep(args.notebook, _grid(args.param), jobs=args.jobs, out=args.out, profile=args.profile)


def cmd_report(args) -> dict:
    from . import records
    out_dir = args.out or args.run_dirs[0]
    res = records.write_report(args.run_dirs, out_dir)
    if args.readme:
        records.update_readme(args.readme, res, out_dir)
    if not args.json:
        print(res["markdown"])
        print("wrote " + ", ".join(res["files"]), file=sys.stderr)
    return {k: res[k] for k in ("rows", "failures", "machines", "profiles", "files")}


def cmd_student(args) -> dict:
    from . import course
    written = course.build_student(args.out_dir, only=args.only)
    for path, found in written:
        print(f"{path}  {len(found)} exercises: {', '.join(e.name for e in found)}", file=sys.stderr)
    out = {"notebooks": [{"path": str(p), "exercises": [e.name for e in f]} for p, f in written]}
    if args.prove:
        rows = course.prove(only=args.only, progress=not args.json)
        out["proof"] = rows
        out["failed"] = [f"{r['notebook']}/{r['exercise']}" for r in rows if not (r["stub_ok"] and r["solution_ok"])]
    return out


def cmd_grade(args) -> dict:
    from . import course, records
    rows = course.grade(args.submissions)
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["submission", "notebook", "exercise", "passed", "message"])
            w.writeheader()
            w.writerows(rows)
    if not args.json:
        print(records.markdown_table(rows, ("submission", "exercise", "passed", "message")))
        print(f"{sum(r['passed'] for r in rows)} of {len(rows)} exercises pass", file=sys.stderr)
    return {"rows": rows}


def _model_args(sp: argparse.ArgumentParser, default: str = "tiny") -> None:
    """--model, --checkpoint, --weights, --device and --json, shared by the verbs that load a SAM."""
    from .models import CONFIGS, WEIGHT_KINDS
    sp.add_argument("--model", default=default, choices=list(CONFIGS))
    sp.add_argument("--checkpoint", help="path to a SAM state dict for --model")
    sp.add_argument("--weights", choices=list(WEIGHT_KINDS),
                    help="random: timing only, labelled so in every result")
    sp.add_argument("--device", type=device, default="cpu")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _verb_eval(sub: argparse._SubParsersAction) -> None:
    """`edgelab eval`."""
    from .models import CONFIGS
    e = sub.add_parser("eval", help="mIoU on generated scenes, or agreement on a folder of images")
    _model_args(e)
    e.add_argument("--scenes", type=count(1), help="number of scenes (default: the whole eval split)")
    e.add_argument("--seed", type=int, help="first seed of other scenes than the eval split")
    e.add_argument("--prompt", choices=["point", "box"], default="point")
    e.add_argument("--split", choices=["eval", "val"], default="eval",
                   help="eval: the reporting split; val: the split choices are made on")
    e.add_argument("--images", help="folder of JPEG/PNG images (no ground truth)")
    e.add_argument("--reference", choices=list(CONFIGS))
    e.add_argument("--reference-checkpoint")
    e.set_defaults(fn=cmd_eval)


def _verb_bench(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench`."""
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="what", required=True)
    for add in BENCH_TARGETS:
        add(bsub)


def _bench_encoder(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench encoder`."""
    be = sub.add_parser("encoder", help="image encoder and mask decoder latency")
    _model_args(be)
    be.add_argument("--image-size", type=count(1), help="input side in px (default: the model's)")
    be.add_argument("--batch", type=count(1), default=1)
    be.add_argument("--prompts", type=count(1), default=8, help="point prompts per decoder call")
    be.add_argument("--repeats", type=count(1), default=5)
    be.add_argument("--attention", metavar="V1,V2,...",
                    help="compare attention variants in one run (reference, sdpa, fused, folded, tiled, "
                         "compiled): median_s, peak_mem_mb, max_abs_err, rel_err per variant")
    be.add_argument("--seed", type=int, default=0, help="seed of the input (and of random rel-pos tables)")
    be.add_argument("--no-memory", action="store_true", help="with --attention: skip the peak-memory runs")
    be.set_defaults(fn=cmd_bench_encoder)


def _bench_prune(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench prune`."""
    from .pruning import DEFAULT_KINDS, KINDS
    bp = sub.add_parser("prune", help="Frobenius-norm channel pruning at several ratios (notebook 02)")
    _model_args(bp)
    bp.add_argument("--ratios", default="0.2,0.4,0.6", help="comma-separated pruning ratios")
    bp.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help=f"what to prune: {', '.join(KINDS)} (comma-separated)")
    bp.add_argument("--finetune-steps", type=count(0), default=0, help="fine-tuning steps per pruned variant")
    bp.add_argument("--scenes", type=count(1), default=50, help="eval scenes for mIoU (trained weights)")
    bp.add_argument("--image-size", type=count(1), help="input side in px (with --weights random)")
    bp.add_argument("--repeats", type=count(1), default=5)
    bp.set_defaults(fn=cmd_bench_prune)


def _bench_quant(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench quant`."""
    bq = sub.add_parser("quant", help="FP32 / BF16 / INT8 variants in one run (notebook 03)")
    _model_args(bq)
    bq.add_argument("--variants", default="fp32,bf16,int8_weight_only,w8a8,w8a8_fbgemm",
                    help="comma-separated: fp32, bf16, int8_weight_only, int4_weight_only, w8a8, "
                         "w8a8_fbgemm, w8a8_torchao")
    bq.add_argument("--attention", help="attention variant for every model (chapter 01), e.g. fused; "
                                        "adds fp32_reference (SAM's own attention) to the run")
    bq.add_argument("--scenes", type=count(1), default=50, help="eval scenes for mIoU (trained weights)")
    bq.add_argument("--image-size", type=count(1), help="input side in px (with --weights random)")
    bq.add_argument("--repeats", type=count(1), default=5)
    bq.set_defaults(fn=cmd_bench_quant)


def _bench_distill(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench distill`."""
    bd = sub.add_parser("distill", help="the tiny teacher and each shipped student (notebook 04)")
    bd.add_argument("--student", action="append", metavar="PATH",
                    help="a student saved by `edgelab distill` (repeatable; default: the shipped one)")
    bd.add_argument("--scenes", type=count(1), default=50, help="eval scenes for mIoU and agreement")
    bd.add_argument("--repeats", type=count(1), default=30)
    bd.add_argument("--device", type=device, default="cpu")
    bd.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    bd.set_defaults(fn=cmd_bench_distill)


def _bench_everything(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench everything`."""
    bev = sub.add_parser("everything", help="segment everything: the automatic mask generator, timed and scored (chapter 05)")
    bev.add_argument("--scenes", type=count(1), default=10)
    bev.add_argument("--split", choices=["eval", "val"], default="eval")
    bev.add_argument("--points-per-side", type=count(1), default=16)
    bev.add_argument("--device", type=device, default="cpu")
    bev.add_argument("--json", action="store_true")
    bev.set_defaults(fn=cmd_bench_everything)


def _bench_machine(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench machine`."""
    bm = sub.add_parser("machine", help="this machine's GEMM rates per dtype and memory bandwidth (the roofline)")
    bm.add_argument("--n", type=count(1), default=1024, help="GEMM size n x n x n")
    bm.add_argument("--mb", type=count(1), default=256, help="buffer copied to measure the bandwidth")
    bm.add_argument("--repeats", type=count(1), default=5)
    bm.add_argument("--json", action="store_true")
    bm.set_defaults(fn=cmd_bench_machine)


def _bench_deploy(sub: argparse._SubParsersAction) -> None:
    """`edgelab bench deploy` (the stack's defaults are `deploy.StackConfig`'s)."""
    from .deploy import StackConfig
    bdp = sub.add_parser("deploy", help="the stack, ONNX Runtime and OpenVINO variants of tiny (notebook 05)")
    bdp.add_argument("--out", default="runs/deploy", help="run folder for the pruned model and ONNX files")
    bdp.add_argument("--scenes", type=count(1), default=30, help="eval scenes for mIoU and agreement")
    bdp.add_argument("--repeats", type=count(1), default=20)
    bdp.add_argument("--attention", default=StackConfig.attention,
                     help="chapter 01's attention variant for the fused step")
    bdp.add_argument("--prune-ratio", type=float, default=StackConfig.prune_ratio)
    bdp.add_argument("--finetune-steps", type=count(0), default=StackConfig.finetune_steps)
    bdp.add_argument("--prompts", type=count(1), default=StackConfig.prompts, help="point prompts per frame")
    bdp.add_argument("--no-memory", action="store_true", help="skip peak memory (a fresh process)")
    bdp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    bdp.set_defaults(fn=cmd_bench_deploy)


def _verb_distill(sub: argparse._SubParsersAction) -> None:
    """`edgelab distill`."""
    from .distillation import LOSSES, PROFILES, STUDENTS, DistillConfig
    d = sub.add_parser("distill", help="distil tiny's image encoder into a student (notebook 04); "
                                       "the same under `torchrun -m edgelab distill`")
    d.add_argument("--out", default="runs/distill", help="run folder (checkpoints, log, student.pt)")
    d.add_argument("--student", default=DistillConfig.student, choices=list(STUDENTS))
    d.add_argument("--profile", choices=list(PROFILES), default="quick")
    d.add_argument("--steps", type=count(1), help="override the profile's steps")
    d.add_argument("--pool-scenes", type=count(1), help="override the profile's scene pool")
    d.add_argument("--batch-images", type=count(1), default=DistillConfig.batch_images)
    d.add_argument("--lr", type=real(0, above=True), default=DistillConfig.lr)
    d.add_argument("--loss", choices=LOSSES, default=DistillConfig.loss)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval-scenes", type=count(1), default=DistillConfig.eval_scenes)
    d.add_argument("--init", default="", help="start from this saved student's weights (a warm start)")
    d.add_argument("--prompt-weight", type=real(0), default=DistillConfig.prompt_weight,
                   help="add the prompt-in-the-loop loss (decoder masks vs the teacher's) with this weight")
    d.add_argument("--prompt-points", type=count(1), default=DistillConfig.prompt_points,
                   help="random point prompts per image for that loss")
    d.add_argument("--task-weight", type=real(0), default=DistillConfig.task_weight,
                   help="add the task loss (decoder masks vs the scenes' exact masks) with this weight")
    d.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out")
    d.add_argument("--no-progress", action="store_true", help="no progress bar (--json implies it)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_distill)


def _verb_train_tiny(sub: argparse._SubParsersAction) -> None:
    """`edgelab train-tiny`."""
    t = sub.add_parser("train-tiny", help="reproduce the shipped tiny SAM from its seed")
    t.add_argument("--out", default="runs/train-tiny")
    t.add_argument("--steps", type=count(1))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hours", type=real(0, 48, above=True),
                   help="training-time budget: the schedule spans it, summed over resumes")
    t.add_argument("--stop-after", type=count(1), help="end at this step (the schedule still spans --steps)")
    t.add_argument("--threads", type=count(0), default=0, help="torch threads (0: torch's default)")
    t.add_argument("--eval-scenes", type=count(1), default=training_default("eval_scenes"),
                   help="validation scenes scored at each checkpoint")
    t.add_argument("--checkpoint-minutes", type=real(0, above=True), default=training_default("checkpoint_minutes"))
    t.add_argument("--lr", type=real(0, 1, above=True), default=training_default("lr"), help="peak learning rate")
    t.add_argument("--warmup", type=count(0), default=training_default("warmup"), help="warm-up steps")
    t.add_argument("--box-noise", type=real(0, 0.5), default=training_default("box_noise"),
                   help="std of the training boxes' corner noise, a fraction of the box's side")
    t.add_argument("--init", help="start from these tiny weights (a second training phase)")
    t.add_argument("--freeze-encoder", action="store_true",
                   help="train the prompt encoder and mask decoder only (the image encoder stays as --init has it)")
    t.add_argument("--iou-weight", type=real(0, 100), default=training_default("iou_weight"),
                   help="weight of the IoU head's loss beside the mask loss")
    t.add_argument("--box-prompts", type=count(0, 64), default=training_default("box_prompts"),
                   help="box prompts per training scene")
    t.add_argument("--scene-offset", type=count(0), default=training_default("scene_offset"),
                   help="first training scene seed (a second phase draws scenes the first never saw)")
    t.add_argument("--batch-images", type=count(1, 1024), default=training_default("batch_images"),
                   help="scenes per step (a GPU wants more than the CPU recipe's; scale --lr with it)")
    t.add_argument("--workers", type=count(0, 256), default=training_default("workers"),
                   help="processes drawing scenes ahead of the model (0: in the loop; a GPU wants most of its cores)")
    t.add_argument("--device", type=device, default="cpu", help="cpu, or cuda for a GPU (same command, same batches)")
    t.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_train_tiny)


def _verb_tune_iou_head(sub: argparse._SubParsersAction) -> None:
    """`edgelab tune-iou-head`."""
    h = sub.add_parser("tune-iou-head", help="refit only tiny's IoU head (its masks stay as they are)")
    h.add_argument("--init", default="data/sam_tiny.pt", help="the tiny weights whose IoU head is refitted")
    h.add_argument("--out", default="runs/tune-iou-head")
    h.add_argument("--scenes", type=count(1), default=3000, help="training scenes sampled")
    h.add_argument("--scene-offset", type=count(0), default=5_000_000, help="first training scene seed")
    h.add_argument("--steps", type=count(1), default=3000)
    h.add_argument("--lr", type=real(0, 1, above=True), default=1e-3)
    h.add_argument("--threads", type=count(0), default=0, help="torch threads (0: torch's default)")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_tune_iou_head)


def _verb_run(sub: argparse._SubParsersAction) -> None:
    """`edgelab run`."""
    r = sub.add_parser("run", help="execute the notebooks with papermill into a run folder")
    r.add_argument("--profile", choices=["quick", "full"], default="quick")
    r.add_argument("--out", default=None, help="run folder (default runs/<profile>-<time>)")
    r.add_argument("--only", nargs="+", help="notebook names (or prefixes like 00)")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="set a parameter of the notebooks (a Python literal, else a string)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_run)


def _verb_sweep(sub: argparse._SubParsersAction) -> None:
    """`edgelab sweep`."""
    sw = sub.add_parser("sweep", help="run one notebook over a parameter grid in parallel processes")
    sw.add_argument("notebook", help="notebook name or prefix, e.g. 02")
    sw.add_argument("-p", "--param", nargs="+", action="append", metavar="NAME V1",
                    help="NAME V1 [V2 ...]: values of one parameter (repeat -p for a grid)")
    sw.add_argument("--jobs", type=count(1), default=1, help="points run at once, each in its own process")
    sw.add_argument("--profile", choices=["quick", "full"], default="quick")
    sw.add_argument("--out", default=None, help="sweep folder (default runs/sweep-<nb>-<time>)")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(fn=cmd_sweep)


def _verb_report(sub: argparse._SubParsersAction) -> None:
    """`edgelab report`."""
    rep = sub.add_parser("report", help="gather results records into one table (Markdown, CSV, HTML) and a plot")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="folder for report.md/.csv/.html and latency_miou.png (default: the first run folder)")
    rep.add_argument("--readme", help="also rewrite this README's results section (between its markers)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(fn=cmd_report)


def _verb_student(sub: argparse._SubParsersAction) -> None:
    """`edgelab student`."""
    st = sub.add_parser("student", help="write the student notebooks (solutions stubbed, outputs cleared)")
    st.add_argument("out_dir")
    st.add_argument("--only", nargs="+", help="notebook names (or prefixes like 00)")
    st.add_argument("--prove", action="store_true",
                    help="also prove that every check fails on its stub with a hint and passes on the solution")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_student)


def _verb_grade(sub: argparse._SubParsersAction) -> None:
    """`edgelab grade`."""
    g = sub.add_parser("grade", help="run the exercises of submitted notebooks, one row per exercise")
    g.add_argument("submissions", nargs="+", help="notebooks, or folders of them (one folder per student)")
    g.add_argument("--csv", help="also write the rows to this CSV file")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_grade)


BENCH_TARGETS = (_bench_encoder, _bench_prune, _bench_quant, _bench_distill, _bench_everything, _bench_machine,
                 _bench_deploy)
VERBS = (_verb_eval, _verb_bench, _verb_distill, _verb_train_tiny, _verb_tune_iou_head, _verb_run, _verb_sweep,
         _verb_report, _verb_student, _verb_grade)


def build_parser() -> argparse.ArgumentParser:
    """The `edgelab` parser: each `_verb_*` function adds one verb, each `_bench_*` one benchmark."""
    p = Parser(prog=PROG, description="edgelab: making SAM fast and small on a CPU.")
    sub = p.add_subparsers(dest="verb", required=True)
    for add in VERBS:
        add(sub)
    return p


PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line is one line, as an error is (a skipped file, a fallback);
    another library's keeps its category and where it came from."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        print(f"{PROG}: warning: {category.__name__} from {filename}:{lineno}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import logging
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CUDA-build torch on a CPU
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or bad arguments (2) whose one line Parser.error printed
        return e.code if isinstance(e.code, int) else 2
    from .models import CheckpointError
    try:
        with warnings.catch_warnings():
            if getattr(args, "json", False):
                warnings.simplefilter("ignore")
            warnings.showwarning = _warning_line
            out = args.fn(args)
    except (UsageError, CheckpointError, ValueError, *PATH_ERRORS) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if out is None:  # a torchrun rank other than 0
        return 0
    if getattr(args, "json", False):
        print(json.dumps(out))
    elif args.verb not in ("report", "run", "sweep", "student", "grade"):
        print(json.dumps(out, indent=1))
    return 0 if not (isinstance(out, dict) and out.get("failed")) else 1


if __name__ == "__main__":
    sys.exit(main())
