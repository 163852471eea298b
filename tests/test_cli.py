"""The command-line contract: --json prints one object; bad input is one line on stderr, exit 2."""
import json

import pytest
import torch

from edgelab import cli
from conftest import run_cli




def test_eval_json_has_miou_and_n_masks():
    rc, out, err = run_cli("eval", "--model", "tiny", "--scenes", "2", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert 0 <= d["miou"] <= 1 and d["n_masks"] > 0 and d["weights"] == "trained"


def test_eval_other_seeds_and_box_prompts():
    rc, out, err = run_cli("eval", "--scenes", "2", "--seed", "424242", "--prompt", "box", "--json")
    assert rc == 0, err
    assert json.loads(out)["split"].startswith("seeds 424242")


def test_bench_encoder_json_contract():
    rc, out, err = run_cli("bench", "encoder", "--model", "tiny", "--repeats", "1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["reference"] == "encoder" and d["weights"] == "trained" and "machine" in d
    names = {v["name"] for v in d["variants"]}
    assert names == {"encoder", "decoder"}
    assert all(v["median_s"] > 0 for v in d["variants"])


def test_bench_random_weights_are_labelled_and_resizable():
    rc, out, err = run_cli("bench", "encoder", "--model", "tiny", "--weights", "random", "--image-size", "512",
                       "--repeats", "1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["weights"] == "random" and d["variants"][0]["image_size"] == 512


@pytest.mark.parametrize("args, words", [
    (["eval", "--model", "vit_b"], "checkpoint"),
    (["eval", "--model", "vit_b", "--checkpoint", "/nonexistent/sam_vit_b_01ec64.pth"], "not found"),
    (["eval", "--scenes", "0"], "positive"),
    (["eval", "--images", "/nonexistent/folder", "--reference", "tiny"], "not found"),
    (["bench", "encoder", "--image-size", "512"], "--weights random"),
    (["bench", "encoder", "--weights", "random", "--image-size", "500"], "multiple"),
    (["report", "/nonexistent/run"], "not found"),
])
def test_bad_input_is_one_clear_line(args, words):
    rc, out, err = run_cli(*args)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgelab: error:") and words in lines[0], err
    assert "Traceback" not in err


def test_ranges_are_checked_once_by_the_parser(capsys):
    import argparse
    assert cli.count(0, 64)("64") == 64 and cli.real(0, 1, above=True)("1") == 1.0
    for parse, text, words in [(cli.count(1), "0", "a positive number"), (cli.count(0, 64), "65", "in [0, 64]"),
                               (cli.count(0), "1.5", "whole number"), (cli.real(0, 1, above=True), "0", "in (0, 1]"),
                               (cli.real(0), "-1", "0 or more"), (cli.real(0, above=True), "x", "a number")]:
        with pytest.raises(argparse.ArgumentTypeError, match=words.replace("[", r"\[").replace("(", r"\(")):
            parse(text)
    assert cli.main(["bench", "quant", "--repeats", "0"]) == 2
    assert capsys.readouterr().err.strip() == "edgelab: error: argument --repeats: must be a positive number, not 0"
    with pytest.raises(SystemExit):  # argparse's --help prints and exits; main returns its status
        cli.build_parser().parse_args(["eval", "--help"])
    assert cli.main(["eval", "--help"]) == 0


def test_device_is_checked_by_the_parser(capsys, monkeypatch):
    import argparse
    assert cli.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    for text, words in [("bogus", "a torch device such as cpu or cuda"), ("cuda", "no CUDA device"),
                        ("cuda:1", "no CUDA device"), ("xpu", "runs on cpu or cuda")]:
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            cli.device(text)
    assert cli.main(["train-tiny", "--device", "cuda", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip() == ("edgelab: error: argument --device: cuda: this machine has "
                                               "no CUDA device (use cpu)")


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "sam_vit_b.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    rc, _, err = run_cli("eval", "--model", "vit_b", "--checkpoint", str(bad))
    assert rc == 2 and "not a loadable PyTorch checkpoint" in err and len(err.strip().splitlines()) == 1


def test_empty_image_folder_is_one_clear_line(tmp_path):
    rc, _, err = run_cli("eval", "--images", str(tmp_path), "--reference", "tiny")
    assert rc == 2 and "no JPEG or PNG image" in err
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rc, _, err = run_cli("eval", "--images", str(tmp_path), "--reference", "tiny")
    assert rc == 2 and err.strip().splitlines() == [  # each skipped file one line, then the error
        "edgelab: warning: skipping broken.png: cannot be read as an image (UnidentifiedImageError)",
        "edgelab: warning: skipping notes.txt: not a JPEG or PNG file",
        f"edgelab: error: no JPEG or PNG image in {tmp_path}"], err


def test_agreement_on_a_folder(tmp_path):
    from PIL import Image
    from edgelab import scenes
    Image.fromarray(scenes.make_scene(1, 200).image).save(tmp_path / "a.png")
    rc, out, err = run_cli("eval", "--images", str(tmp_path), "--reference", "tiny", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["agreement"] == pytest.approx(1.0) and d["n_images"] == 1


def test_parser_knows_the_verbs():
    """Every verb and bench target parses with its defaults, calls its own cmd_ function, and takes --json."""
    p = cli.build_parser()
    positional = {"report": ["x"], "sweep": ["00"], "student": ["x"], "grade": ["x"]}
    verbs = ["eval", "distill", "train-tiny", "tune-iou-head", "run", "sweep", "report", "student", "grade"]
    targets = ["encoder", "prune", "quant", "distill", "everything", "machine", "deploy"]
    calls = [[v, *positional.get(v, [])] for v in verbs] + [["bench", t] for t in targets]
    for argv in calls:
        args = p.parse_args([*argv, "--json"])
        assert args.verb == argv[0] and args.json
        assert args.fn.__name__ == "cmd_" + "_".join(argv[:2] if argv[0] == "bench" else argv[:1]).replace("-", "_")
    assert len(calls) == len(cli.VERBS) - 1 + len(cli.BENCH_TARGETS)
    from edgelab import deploy, pruning
    d = p.parse_args(["bench", "deploy"])  # the library's defaults, not copies of them
    assert (d.attention, d.prune_ratio, d.finetune_steps) == (deploy.StackConfig.attention,
                                                             deploy.StackConfig.prune_ratio,
                                                             deploy.StackConfig.finetune_steps)
    assert p.parse_args(["bench", "prune"]).kinds.split(",") == list(pruning.DEFAULT_KINDS)


def test_readme_commands_parse(monkeypatch):
    """Every `edgelab` command in the README's bash blocks is one the parser takes (flags drift)."""
    import re
    import shlex
    from pathlib import Path
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the README's GPU command, on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    text = (Path(__file__).parent.parent / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            at = [i for i, w in enumerate(words) if w.endswith("edgelab")]
            if at:
                commands.append(words[at[0] + 1:])
    assert len(commands) >= 20, commands
    parser = cli.build_parser()
    for argv in commands:
        assert parser.parse_args(argv).fn.__name__.startswith("cmd_"), argv
