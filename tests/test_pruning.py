"""edgelab.pruning: Frobenius ranking by hand and in torch-pruning, SAM's encoder pruned and rebuilt.

Small on purpose (2-core CPU): the tiny architecture with random weights, a few scenes, a few
fine-tuning steps; vit_b only at a small input size.
"""
import json

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from edgelab import checks, cli, models, pruning, scenes
from conftest import run_cli


@pytest.fixture(scope="module")
def tiny():
    """A private tiny SAM (random weights, random rel-pos tables so that they matter)."""
    torch.manual_seed(0)
    sam = models.load_sam("tiny", weights="random")
    with torch.no_grad():
        for b in sam.image_encoder.blocks:
            b.attn.rel_pos_h.normal_(0, 0.1)
            b.attn.rel_pos_w.normal_(0, 0.1)
    return sam


def encode(sam, seed=0):
    size = sam.image_encoder.img_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sam.image_encoder(x)


# ---------------------------------------------------------------- by hand

def test_ranking_and_counting_rule():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    assert pruning.frobenius_norms(w).tolist() == [5.0, 1.0, 2.0]
    assert pruning.rank_channels(w).tolist() == [1, 2, 0]
    assert pruning.keep_indices(w, 0.4).tolist() == [0]  # int(3 * 0.6) = 1 kept
    assert pruning.n_kept(512, 0.4) == 307 and pruning.n_kept(4, 0.4) == 2 and pruning.n_kept(4, 0.9) == 1
    assert pruning.n_kept(512, 0.4, round_to=8) == 304 and pruning.n_kept(100, 0.0, round_to=8) == 100
    with pytest.raises(ValueError):
        pruning.n_kept(10, 1.0)


def test_conv_and_linear_pairs_keep_the_kept_channels_exactly():
    torch.manual_seed(1)
    c1, c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 5, 1)
    keep = pruning.keep_indices(c1.weight, 0.5)
    n1, n2 = pruning.prune_conv_pair(c1, c2, keep)
    x = torch.randn(2, 3, 9, 9)
    mask = torch.zeros(8)
    mask[keep] = 1
    with torch.no_grad():
        assert torch.equal(n1.weight, c1.weight[keep]) and torch.equal(n1.bias, c1.bias[keep])
        torch.testing.assert_close(n1(x), c1(x)[:, keep], rtol=0, atol=1e-6)
        torch.testing.assert_close(n2(torch.relu(n1(x))), c2(torch.relu(c1(x)) * mask.view(1, 8, 1, 1)))
    l1, l2 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 4)
    keep = pruning.keep_indices(l1.weight, 0.3)
    m1, m2 = pruning.prune_linear_pair(l1, l2, keep)
    assert (m1.out_features, m2.in_features, m2.out_features) == (7, 7, 4)
    with torch.no_grad():  # the same weights; a GEMM of another width may round differently (1 ulp)
        assert torch.equal(m1.weight, l1.weight[keep]) and torch.equal(m1.bias, l1.bias[keep])
        torch.testing.assert_close(m1(torch.ones(1, 6)), l1(torch.ones(1, 6))[:, keep], rtol=0, atol=1e-6)


def test_magnitude_sparsify_zeroes_the_smallest_fraction():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    s = pruning.magnitude_sparsify(w, 0.4)
    assert s.shape == w.shape and abs((s == 0).float().mean().item() - 0.4) < 0.01
    assert s[s != 0].abs().min() >= w.abs().flatten().kthvalue(int(0.4 * w.numel())).values


def test_sparsified_copy_zeroes_the_chosen_weights_of_every_block_only(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    sparse = pruning.sparsified_copy(tiny, 0.4, ("mlp",))
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # original untouched
    for b_new, b_old in zip(sparse.image_encoder.blocks, tiny.image_encoder.blocks):
        for name in ("lin1", "lin2"):
            w_new, w_old = getattr(b_new.mlp, name).weight, getattr(b_old.mlp, name).weight
            assert w_new.shape == w_old.shape
            assert abs((w_new == 0).float().mean().item() - 0.4) < 0.01
            assert torch.equal(w_new, pruning.magnitude_sparsify(w_old, 0.4))
            assert torch.equal(getattr(b_new.mlp, name).bias, getattr(b_old.mlp, name).bias)
        assert torch.equal(b_new.attn.qkv.weight, b_old.attn.qkv.weight)
    both = pruning.sparsified_copy(tiny, 0.5, ("mlp", "attn"))
    assert abs((both.image_encoder.blocks[0].attn.proj.weight == 0).float().mean().item() - 0.5) < 0.01
    assert not torch.equal(encode(sparse), encode(tiny))
    torch.testing.assert_close(encode(pruning.sparsified_copy(tiny, 0.0)), encode(tiny))
    with pytest.raises(ValueError):
        pruning.sparsified_copy(tiny, 0.4, ("neck",))


def test_torch_pruning_ranks_like_the_hand_rule():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3), torch.nn.ReLU(), torch.nn.Conv2d(12, 6, 3))
    imp = pruning.torch_pruning_importance(net, net[0], torch.randn(1, 3, 16, 16))
    assert torch.argsort(imp).tolist() == pruning.rank_channels(net[0].weight).tolist()
    torch.testing.assert_close(imp, pruning.frobenius_norms(net[0].weight) ** 2)


# ---------------------------------------------------------------- SAM's encoder

def _zero_and_compare(sam, plan, zero):
    """Zero some channels so that removing them cannot change the output; prune; compare."""
    model = pruning.pruned_copy(sam, pruning.PrunePlan.none(6))  # a private copy
    with torch.no_grad():
        zero(model)
    before = encode(model)
    pruning.prune_encoder(model, plan)
    torch.testing.assert_close(encode(model), before, atol=1e-5, rtol=1e-4)
    return model


def test_pruning_zeroed_mlp_channels_heads_and_head_dims_changes_nothing(tiny):
    def zero_mlp(m):  # the 205 lowest channels of block 1 (40% of 512): rows, bias, columns
        mlp = m.image_encoder.blocks[1].mlp
        idx = torch.arange(205) * 2
        mlp.lin1.weight[idx] = 0
        mlp.lin1.bias[idx] = -20  # GELU(-20) = 0
        mlp.lin2.weight[:, idx] = 0
    m = _zero_and_compare(tiny, pruning.PrunePlan.none(6, round_to=1).with_block(1, "mlp", 0.4), zero_mlp)
    assert m.image_encoder.blocks[1].mlp.lin1.out_features == 307

    def zero_heads(m):  # heads 0 and 3 of block 2 (a global block): all their q, k, v rows
        attn = m.image_encoder.blocks[2].attn
        rows = attn.qkv.weight.view(3, 4, 32, -1)
        rows[:, [0, 3]] = 0
        attn.qkv.bias.view(3, 4, 32)[:, [0, 3]] = 0
    m = _zero_and_compare(tiny, pruning.PrunePlan.none(6, round_to=1).with_block(2, "heads", 0.4), zero_heads)
    attn = m.image_encoder.blocks[2].attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 64 and attn.proj.in_features == 64
    assert attn.rel_pos_h.shape[1] == 32  # whole heads go, the shared rel-pos tables stay

    def zero_dims(m):  # channels 5..17 of every head of block 0 (windowed), and the rel-pos columns
        attn = m.image_encoder.blocks[0].attn
        attn.qkv.weight.view(3, 4, 32, -1)[:, :, 5:18] = 0
        attn.qkv.bias.view(3, 4, 32)[:, :, 5:18] = 0
        attn.rel_pos_h[:, 5:18] = 0
        attn.rel_pos_w[:, 5:18] = 0
    m = _zero_and_compare(tiny, pruning.PrunePlan.none(6, round_to=1).with_block(0, "head_dim", 0.4), zero_dims)
    attn = m.image_encoder.blocks[0].attn
    assert attn.rel_pos_h.shape == (2 * 8 - 1, 19) and attn.qkv.out_features == 3 * 4 * 19


def test_torch_pruning_mlp_matches_the_hand_slicing(tiny):
    block = tiny.image_encoder.blocks[3]
    keep = pruning.keep_indices(block.mlp.lin1.weight, 0.4, round_to=8)  # 307 rounded down to 304
    hand1, hand2 = pruning.prune_linear_pair(block.mlp.lin1, block.mlp.lin2, keep)
    model = pruning.pruned_copy(tiny, pruning.PrunePlan.uniform(0.4, 6, ["mlp"]))
    assert len(keep) == 304
    tp_mlp = model.image_encoder.blocks[3].mlp
    assert torch.equal(tp_mlp.lin1.weight, hand1.weight) and torch.equal(tp_mlp.lin2.weight, hand2.weight)


def test_coupled_layers_names_what_one_channel_touches(tiny):
    """Notebook 02's dependency-graph cell: names come from the encoder's own named modules and parameters."""
    import torch_pruning as tp
    enc = tiny.image_encoder
    dg = pruning.dependency_graph(enc)
    assert pruning.coupled_layers(dg, enc.blocks[0].mlp.lin1, tp.prune_linear_out_channels) == [
        "blocks.0.mlp.lin1 (out)", "blocks.0.mlp.lin2 (in)"]
    assert pruning.coupled_layers(dg, enc.neck[0], tp.prune_conv_out_channels) == [
        "neck.0 (out)", "neck.1.bias (out)", "neck.1.weight (out)", "neck.2 (in)"]
    embed = pruning.coupled_layers(dg, enc.patch_embed.proj, tp.prune_conv_out_channels)
    assert {"patch_embed.proj (out)", "pos_embed (out)", "neck.0 (in)"} <= set(embed) and "?" not in " ".join(embed)


def test_encoder_macs_counts_any_sam_and_resizes_only_what_it_can_rebuild(tiny):
    from edgelab import bench, distillation
    student = distillation.make_student(tiny, "resnet18")  # labelled "student:...": not a models config
    assert pruning.encoder_macs(student) == bench.encoder_macs(student) > 0
    assert pruning.encoder_macs(tiny) == bench.encoder_macs(tiny)  # the meta rebuild counts the same
    assert pruning.encoder_macs(tiny, img_size=512) > 4 * pruning.encoder_macs(tiny)
    with pytest.raises(ValueError, match="cannot resize"):
        pruning.encoder_macs(student, img_size=512)


@pytest.mark.parametrize("kinds", [["mlp", "heads", "neck"], ["embed"], ["head_dim", "mlp"]])
def test_pruned_sam_runs_in_sam_predictor_with_the_decoder_untouched(tiny, kinds):
    model = pruning.pruned_copy(tiny, pruning.PrunePlan.uniform(0.4, 6, kinds))
    assert models.count_params(model.image_encoder) < models.count_params(tiny.image_encoder)
    assert pruning.encoder_macs(model) < pruning.encoder_macs(tiny)
    for part in ("prompt_encoder", "mask_decoder"):
        a, b = getattr(model, part).state_dict(), getattr(tiny, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert encode(model).shape == encode(tiny).shape  # the neck still outputs prompt_dim channels
    scene = scenes.make_scene(3)
    pred = SamPredictor(model)
    pred.set_image(scene.image)
    masks, scores, _ = pred.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 256, 256) and np.isfinite(scores).all()


def test_embedding_width_reaches_every_coupled_layer(tiny):
    model = pruning.pruned_copy(tiny, pruning.PrunePlan.uniform(0.4, 6, ["embed"]))
    enc, d = model.image_encoder, 72  # int(128 * 0.6) = 76, rounded down to a multiple of 8
    assert enc.patch_embed.proj.out_channels == d and enc.pos_embed.shape[-1] == d
    assert enc.neck[0].in_channels == d and enc.neck[0].out_channels == 128
    for b in enc.blocks:
        assert b.norm1.normalized_shape == (d,) and b.attn.qkv.in_features == d and b.attn.proj.out_features == d
        assert b.mlp.lin1.in_features == d and b.mlp.lin2.out_features == d


def test_save_and_reload_a_pruned_model(tiny, tmp_path):
    plan = pruning.PrunePlan.uniform(0.4, 6, ["mlp", "heads", "neck"]).with_block(0, "head_dim", 0.25)
    model = pruning.pruned_copy(tiny, plan)
    path = pruning.save_pruned(model, tmp_path / "pruned.pt")
    torch.load(path, weights_only=True)  # plain tensors, strings and numbers only
    back = pruning.load_pruned(path)
    assert pruning.architecture(back) == pruning.architecture(model)
    torch.testing.assert_close(encode(back), encode(model))
    torch.save(tiny.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(models.CheckpointError, match="not a pruned SAM"):
        pruning.load_pruned(tmp_path / "plain.pt")


def test_vit_b_prunes_at_a_small_input_and_counts_macs_at_1024():
    torch.manual_seed(0)
    vit = models.load_sam("vit_b", weights="random", img_size=64)
    model = pruning.pruned_copy(vit, pruning.PrunePlan.uniform(0.4, 12, ["mlp", "heads", "neck"]))
    arch = pruning.architecture(model)
    assert arch["blocks"][0] == {"heads": 7, "head_dim": 64, "mlp": 1840, "scale": 64 ** -0.5}
    assert arch["neck"] == 152 and arch["embed"] == 768
    assert encode(model).shape == (1, 256, 4, 4)
    full, pruned = pruning.encoder_macs(vit, img_size=1024), pruning.encoder_macs(model, img_size=1024)
    assert 0.4 < pruned / full < 0.75 and full > 400e9


def test_plan_from_scan_spends_the_budget_where_it_hurts_least():
    rows = [{"block": -1, "kind": "none", "ratio": 0.0, "score": 0.8, "macs": 100}]
    for b, drop in [(0, 0.30), (1, 0.01)]:
        rows += [{"block": b, "kind": "mlp", "ratio": 0.5, "score": 0.8 - drop, "macs": 90},
                 {"block": b, "kind": "mlp", "ratio": 0.75, "score": 0.8 - 2 * drop, "macs": 85}]
    plan = pruning.plan_from_scan(rows, macs_budget=86, depth=2)
    assert plan.mlp == (0.0, 0.75)
    plan = pruning.plan_from_scan(rows, macs_budget=75, depth=2)
    assert plan.mlp[1] == 0.75 and plan.mlp[0] > 0


def test_finetune_trains_the_encoder_only(tiny):
    model = pruning.pruned_copy(tiny, pruning.PrunePlan.uniform(0.4, 6, ["mlp", "heads"]))
    dec = {k: v.clone() for k, v in model.mask_decoder.state_dict().items()}
    enc = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    cfg = pruning.FinetuneConfig(steps=1, batch_images=1, distill=1.0)
    hist = pruning.finetune(model, cfg, teacher=tiny, progress=False)
    assert len(hist) == 1 and all(np.isfinite(h["mask_loss"]) and np.isfinite(h["distill_loss"]) for h in hist)
    assert all(torch.equal(v, model.mask_decoder.state_dict()[k]) for k, v in dec.items())
    assert any(not torch.equal(v, model.image_encoder.state_dict()[k]) for k, v in enc.items())
    with pytest.raises(ValueError, match="teacher"):
        pruning.finetune(model, cfg, teacher=None)


# ---------------------------------------------------------------- exercise checks

def stub(*args):
    raise NotImplementedError


def test_frobenius_check_passes_the_library_and_catches_wrong_rules():
    checks.check_frobenius_ranking(pruning.rank_channels)
    for wrong, words in [(stub, "not implemented"), (lambda w: None, "no answer"),
                         (lambda w: torch.argsort(w.flatten(1).norm(dim=1), descending=True), "descending"),
                         (lambda w: torch.argsort(w.flatten(1).abs().sum(1)), "Hint"),
                         (lambda w: torch.argsort(w.flatten(1).sum(1)), "Hint"),
                         (lambda w: torch.argsort(w.transpose(0, 1).flatten(1).norm(dim=1)), "Hint")]:
        with pytest.raises(checks.ExerciseError, match=words):
            checks.check_frobenius_ranking(wrong)


def test_prune_conv_check_passes_the_library_and_catches_mistakes():
    def right(c1, c2, r):
        return pruning.prune_conv_pair(c1, c2, pruning.keep_indices(c1.weight, r))

    def lowest_kept(c1, c2, r):
        keep = torch.sort(pruning.rank_channels(c1.weight)[:pruning.n_kept(10, r)]).values
        return pruning.prune_conv_pair(c1, c2, keep)

    def forgot_conv2(c1, c2, r):
        return pruning.prune_conv_pair(c1, c2, pruning.keep_indices(c1.weight, r))[0], c2

    checks.check_prune_conv(right)
    for wrong, words in [(stub, "not implemented"), (lowest_kept, "largest norms"),
                         (forgot_conv2, "input channels"), (lambda a, b, r: (a,), "tuple of two")]:
        with pytest.raises(checks.ExerciseError, match=words):
            checks.check_prune_conv(wrong)


# ---------------------------------------------------------------- command line



def test_bench_prune_json_contract():
    rc, out, err = run_cli("bench", "prune", "--model", "tiny", "--ratios", "0.4", "--finetune-steps", "1",
                           "--scenes", "1", "--repeats", "1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["reference"] == "unpruned" and d["weights"] == "trained" and "machine" in d
    assert [v["name"] for v in d["variants"]] == ["unpruned", "prune-0.4"]
    for v in d["variants"]:
        assert v["params"] > 0 and v["macs"] > 0 and v["median_s"] > 0 and 0 <= v["miou"] <= 1
    assert d["variants"][1]["macs"] < 0.65 * d["variants"][0]["macs"]
    assert d["pruning"]["finetune_steps"] == 1


@pytest.mark.parametrize("args, words", [
    (["--ratios", "0.2,abc"], "--ratios"),
    (["--ratios", "1.5"], "between 0 and 1"),
    (["--kinds", "mlp,wings"], "--kinds"),
    (["--finetune-steps", "-3"], "--finetune-steps"),
    (["--model", "vit_b"], "checkpoint"),
    (["--weights", "random", "--finetune-steps", "5"], "random"),
])
def test_bench_prune_bad_input_is_one_clear_line(args, words, capsys):
    rc = cli.main(["bench", "prune", *args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("edgelab: error:") and words in lines[0], err


def test_default_plan_rounds_widths_to_multiples_of_8_and_head_channels_to_4(tiny):
    arch = pruning.architecture(pruning.pruned_copy(tiny, pruning.PrunePlan.uniform(0.4, 6)))
    assert arch["blocks"][0]["head_dim"] == 16  # int(32 * 0.6) = 19, rounded down to a multiple of 4
    assert arch["blocks"][0]["mlp"] == 304 and arch["embed"] == 72 and arch["neck"] == 72
