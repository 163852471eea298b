"""Writes 00_segment_anything_tour.ipynb (source of truth for its cells; outputs come from running it)."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# 00 · A tour of Segment Anything, on a CPU

**What you will learn**
- SAM's three parts: a heavy image encoder, a light prompt encoder, a light mask decoder;
- the workbook's embedded model `tiny`: a small SAM built from `segment_anything`'s own classes and trained here on generated scenes;
- how to segment objects from point and box prompts, and how we score masks (the protocol every later chapter reports);
- where a frame's time goes on this machine: encoder versus decoder.

**Runs in** about 1-2 minutes on a 2-core CPU (quick profile). Every number below is measured when the notebook runs."""),
code("""# Parameters (papermill). Quick profile by default; `edgelab run --profile full` uses the `# full:` values.
model_name = "tiny"          # tiny | vit_b | vit_l | vit_h
checkpoint = None            # path to a SAM checkpoint file of yours (e.g. sam_vit_b_01ec64.pth)
weights = None               # None: trained tiny / your checkpoint; "random": timing only
images_dir = None            # a folder of your own JPEG/PNG photos (no ground truth needed)
n_eval = 50                  # full: 200
bench_repeats = 3            # full: 7
seed = 0
device = "cpu"
results_dir = "../runs/notebooks/results\""""),
code("""import time, tempfile, json
from pathlib import Path
import numpy as np, torch, matplotlib.pyplot as plt
from segment_anything import SamPredictor
from edgelab import bench, checks, evaluate, models, records, scenes, viz

torch.manual_seed(seed)
sam = models.load_sam(model_name, checkpoint=checkpoint, weights=weights, device=device)
weights_kind = models.weights_label(sam)
print(f"{model_name}: {weights_kind} weights from {sam.edgelab.source}")
if weights_kind == "random":
    print("RANDOM WEIGHTS: timings below are real, masks and mIoU are meaningless")"""),
md("""## SAM's three parts

SAM splits segmentation in two. The **image encoder**, a ViT, runs once per image and turns it into an embedding (a grid of feature vectors). The **prompt encoder** turns clicks and boxes into a few tokens, and the **mask decoder**, a two-way transformer, reads those tokens against the embedding and returns three candidate masks with a predicted IoU for each. Prompting again costs only the decoder. This split is why every later chapter attacks the encoder.

The encoder keeps SAM's structure at every size: windowed attention blocks, a few global attention blocks with relative position embeddings, and a convolutional neck."""),
code("""# NBVAL_CHECK_OUTPUT
cfg = models.describe(model_name)
parts = {"image encoder": sam.image_encoder, "prompt encoder": sam.prompt_encoder, "mask decoder": sam.mask_decoder}
total = models.count_params(sam)
for k, m in parts.items():
    print(f"{k:15s} {models.count_params(m):>12,d} params  ({models.count_params(m) / total:5.1%})")
print(f"input {cfg['img_size']} px, patch {cfg['patch_size']} -> {cfg['grid']}x{cfg['grid']} = {cfg['tokens']} tokens; "
      f"width {cfg['embed_dim']}, depth {cfg['depth']}, heads {cfg['num_heads']}, window {cfg['window_size']}, "
      f"global blocks {list(cfg['global_attn_indexes'])}")"""),
md("""For scale, SAM's published sizes (the poster in the source documents calls them Small 91M / Medium 308M / Large 636M encoder-plus-decoder parameters):"""),
code("""# NBVAL_CHECK_OUTPUT
for name in ["tiny", "vit_b", "vit_l", "vit_h"]:
    shapes = models.build_shapes(name)           # no weights allocated
    n = sum(int(np.prod(s)) for k, s in shapes.items() if not k.startswith(("pixel_",)))
    c = models.describe(name)
    print(f"{name:6s} {n / 1e6:8.2f} M params, {c['img_size']:5d} px input, {c['tokens']:5d} tokens per image")"""),
md("""## Scenes with exact answers

No SAM dataset can be downloaded here, so `edgelab.scenes` draws scenes from a seed: textured backgrounds, 2-12 objects (ellipses, rotated rectangles, polygons, stars, thin bars, small blobs), noise and blur. Objects are painted back to front without anti-aliasing, so each object's *visible* mask is exact. The eval split is a fixed list of 200 seeds that training never touches."""),
code("""# NBVAL_CHECK_OUTPUT
ds = scenes.SceneDataset("eval", n_eval)
shown = [ds.scene(i) for i in range(4)]
fig, axes = plt.subplots(2, 4, figsize=(12, 6))
for ax, s in zip(axes[0], shown):
    ax.imshow(s.image); ax.set_title(f"seed {s.seed}", fontsize=9); ax.axis("off")
for ax, s in zip(axes[1], shown):
    viz.show_masks(np.full_like(s.image, 255), s.masks, ax=ax, title=f"{len(s.masks)} objects")
plt.tight_layout(); plt.show()
print("objects per scene:", [len(s.masks) for s in shown])
print("shapes:", sorted(set(k for s in shown for k in s.shapes)))"""),
md("""## Segmenting from points and boxes

`SamPredictor` is SAM's own user-facing class: `set_image` runs the encoder once, `predict` runs the decoder per prompt. We prompt every object of one scene with a single point, then with its bounding box."""),
code("""scene = shown[0]
predictor = SamPredictor(sam)
points = np.array([evaluate.point_prompt(m) for m in scene.masks])
boxes = np.array([evaluate.box_prompt(m) for m in scene.masks])
by_point = evaluate.predict_masks(predictor, scene.image, points=points)
by_box = evaluate.predict_masks(predictor, scene.image, boxes=boxes)
fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
viz.show_masks(scene.image, scene.masks, ax=axes[0], title="ground truth")
viz.show_masks(scene.image, by_point, ax=axes[1], points=points, title="one point per object")
viz.show_masks(scene.image, by_box, ax=axes[2], boxes=boxes, title="one box per object")
plt.tight_layout(); plt.show()"""),
md("""A single point is ambiguous (the star, or the star and the bar it sits on?), so SAM answers it with three masks and a predicted IoU for each. Here are the three for one object:"""),
code("""predictor.set_image(scene.image)
k = int(np.argmax([m.sum() for m in scene.masks]))
three, scores, _ = predictor.predict(point_coords=points[k:k + 1], point_labels=np.array([1]), multimask_output=True)
fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
for ax, m, sc in zip(axes, three, scores):
    viz.show_masks(scene.image, m[None], ax=ax, points=points[k:k + 1],
                   title=f"predicted IoU {sc:.2f}, true IoU {evaluate.iou(m, scene.masks[k]):.2f}")
plt.tight_layout(); plt.show()"""),
md("""## How we score a model

The protocol every chapter uses:
1. one point per object: its centre of mass when that lies inside the mask, otherwise the point farthest from the boundary (a ring's centre of mass is in its hole);
2. SAM's three masks, keep the one with the highest *predicted* IoU (the model chooses, not the ground truth);
3. IoU with the ground-truth mask, averaged over every object of the eval split: the **mIoU**.

Boxes are the second prompt type: unambiguous, so SAM's single-mask output is used.

### Exercise 1: IoU by hand
Complete `my_iou(a, b)` for two boolean masks. Two empty masks agree perfectly."""),
code("""# EXERCISE: iou
def my_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)

checks.check_iou(my_iou)
print("IoU check passed")"""),
md("""### Exercise 2: a prompt point inside the object
Return `(x, y)`: the centre of mass if it lies in the mask, else the pixel farthest from the background. `scipy.ndimage` has both tools."""),
code("""# EXERCISE: point_prompt
from scipy import ndimage

def my_point(mask: np.ndarray) -> tuple[float, float]:
    cy, cx = ndimage.center_of_mass(mask)
    y, x = int(round(cy)), int(round(cx))
    if not mask[y, x]:
        dist = ndimage.distance_transform_edt(mask)
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
    return float(x), float(y)

checks.check_point_prompt(my_point)
print("point prompt check passed")"""),
md("""Now the protocol on the first `n_eval` scenes of the eval split (the full profile uses all 200):"""),
code("""# NBVAL_CHECK_OUTPUT
point_res = evaluate.evaluate_scenes(sam, n_eval, "point", progress=False)
box_res = evaluate.evaluate_scenes(sam, n_eval, "box", progress=False)
print(f"{point_res.n_masks} objects in {point_res.n_images} scenes ({weights_kind} weights)")
print(f"point mIoU {point_res.miou:.2f}   box mIoU {box_res.miou:.2f}")"""),
code("""by_shape = {}
for s_i in range(point_res.n_images):
    pass
kinds = [k for i in range(point_res.n_images) for k in ds.scene(i).shapes]
ious = np.array(point_res.per_object)
fig, ax = plt.subplots(figsize=(6, 3))
names = sorted(set(kinds))
ax.bar(names, [ious[np.array(kinds) == n].mean() for n in names], color="#4c72b0")
ax.set_ylim(0, 1); ax.set_ylabel("point mIoU"); ax.set_title("mIoU by shape kind (point prompts)", fontsize=10)
plt.show()"""),
md("""## Where a frame's time goes

One frame = one encoder pass + one decoder pass for its prompts. We time both in the same run, interleaved (encoder, decoder, encoder, decoder, ...) so that a busier machine slows both alike, and report the median. Multiply-accumulates (MACs) come from `torch.utils.flop_counter`."""),
code("""info = bench.machine_info()
print(f"{info['cpu']} | {info['threads']} threads | avx512_bf16={info['avx512_bf16']} vnni={info['avx512_vnni']} amx={info['amx']}")
size = sam.image_encoder.img_size
x = torch.randn(1, 3, size, size)
n_prompts = 8
pts = torch.rand(n_prompts, 1, 2) * size
lbl = torch.ones(n_prompts, 1, dtype=torch.int)
with torch.inference_mode():
    emb = sam.image_encoder(x)
    def encoder(): sam.image_encoder(x)
    def decoder():
        sp, de = sam.prompt_encoder(points=(pts, lbl), boxes=None, masks=None)
        sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sp, de, True)
    t = bench.compare({"encoder": encoder, "decoder": decoder}, warmup=1, repeats=bench_repeats)
    enc_macs = bench.count_macs(sam.image_encoder, x)
    sp, de = sam.prompt_encoder(points=(pts, lbl), boxes=None, masks=None)
    dec_macs = bench.count_macs(sam.mask_decoder, emb, sam.prompt_encoder.get_dense_pe(), sp, de, True)
viz.bar_seconds(["image encoder", f"decoder ({n_prompts} prompts)"], [t["encoder"].median_s, t["decoder"].median_s],
                [t["encoder"].iqr_s, t["decoder"].iqr_s], title=f"{model_name} ({weights_kind} weights), {size} px")
plt.show()
share = t["encoder"].median_s / (t["encoder"].median_s + t["decoder"].median_s)
print(f"encoder {t['encoder'].median_s * 1e3:.1f} ms, decoder {t['decoder'].median_s * 1e3:.1f} ms -> encoder is {share:.0%} of the frame")"""),
code("""# NBVAL_CHECK_OUTPUT
print(f"encoder {enc_macs / 1e9:.3f} GMACs, decoder ({n_prompts} prompts) {dec_macs / 1e9:.3f} GMACs")"""),
md("""## Your own checkpoint and your own photos

Real SAM weights cannot be downloaded here; they are yours to supply by path. edgelab knows the official file names and sizes, loads with `torch.load(weights_only=True)`, and says clearly what is wrong with a file it cannot use. Rerun this notebook with `-p model_name vit_b -p checkpoint /path/to/sam_vit_b_01ec64.pth` to tour the real model. Without a file, `weights="random"` builds the real architecture for timing studies only.

What a bad file looks like:"""),
code("""# NBVAL_CHECK_OUTPUT
with tempfile.TemporaryDirectory() as tmp:
    tiny_file = Path(tmp) / "tiny_state.pt"
    torch.save(models.build_sam(models.CONFIGS["tiny"]).state_dict(), tiny_file)
    (Path(tmp) / "junk.pth").write_bytes(b"not a checkpoint")
    for path, name in [(Path(tmp) / "missing.pth", "vit_b"), (Path(tmp) / "junk.pth", "vit_b"), (tiny_file, "vit_b")]:
        try:
            models.load_sam(name, checkpoint=path)
        except models.CheckpointError as e:
            print("CheckpointError:", str(e).replace(tmp, "<tmp>"))"""),
md("""A folder of photos has no ground truth, so the score there is **agreement**: the mIoU of a model's masks against a reference model's masks for the same grid of prompt points (MobileSAM's protocol). `images_dir` points at your folder; by default we write a few scenes as PNG files, plus one file that is not an image, to show what the loader does."""),
code("""folder = images_dir
if folder is None:
    folder = tempfile.mkdtemp()
    from PIL import Image
    for i in range(3):
        Image.fromarray(scenes.make_scene(500 + i, size=320).image).save(Path(folder) / f"photo_{i}.png")
    (Path(folder) / "notes.txt").write_text("not an image")
photos = evaluate.image_folder(folder)   # warns about notes.txt and skips it
img = photos[0][1]
grid = evaluate.grid_points(img.shape[:2], per_side=3)
masks = evaluate.predict_masks(SamPredictor(sam), img, points=grid)
viz.show_masks(img, masks, points=grid, title=f"{photos[0][0].name}: {len(grid)} grid prompts"); plt.show()
print(f"{len(photos)} images read")"""),
md("""## Summary

What this notebook measured on this machine, next to what the source documents report:"""),
code("""rows = [
    ("encoder share of a frame", f"{share:.0%}", "attention alone >90% of SAM's runtime (poster, SAM ViT-B/L/H at 1024 px)"),
    (f"{model_name} encoder latency", f"{t['encoder'].median_s * 1e3:.1f} ms", "Small (vit_b) 5.26 s per frame before optimisation (poster, CPU)"),
    ("point mIoU", f"{point_res.miou:.3f}" if weights_kind != "random" else "n/a (random)", "0.68-0.75 for distilled students on real data (thesis slides)"),
    ("box mIoU", f"{box_res.miou:.3f}" if weights_kind != "random" else "n/a (random)", ""),
]
print(f"{'measure':28s} {'this machine':>14s}   source documents")
for a, b, c in rows:
    print(f"{a:28s} {b:>14s}   {c}")"""),
code("""machine = bench.machine_info()
row = {"model": model_name, "weights": weights_kind, "variant": "reference",
       "params": models.count_params(sam), "macs": enc_macs, "median_s": t["encoder"].median_s,
       "iqr_s": t["encoder"].iqr_s, "miou": None if weights_kind == "random" else point_res.miou,
       "miou_box": None if weights_kind == "random" else box_res.miou}
path = records.write_records(results_dir, "00_segment_anything_tour", [row], machine)
print("results record written:", Path(path).name)"""),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.cells[1].metadata["tags"] = ["parameters"]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
nbf.write(nb, "00_segment_anything_tour.ipynb")
