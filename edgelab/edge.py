"""A SAM predictor that needs only numpy and one runtime: ONNX Runtime or OpenVINO (notebook 05,
"The edge predictor").

This is the shape of what would ship on a drone or a camera: two model files written by
`edgelab.deploy` (the image encoder; the prompt encoder and mask decoder), and this file. It
imports neither torch nor anything else of edgelab, so it can be copied on its own:

    from edgelab.edge import EdgePredictor
    pred = EdgePredictor("runs/deploy/tiny_encoder.onnx", "runs/deploy/tiny_decoder.onnx")
    pred.set_image(image)                                   # (H, W, 3) uint8 RGB
    masks = pred.segment(np.array([[120, 80], [40, 200]]))  # one (x, y) point per object

ONNX files (`export_onnx`) run on ONNX Runtime; OpenVINO IR files (`.xml`, from
`deploy.to_openvino`) run on OpenVINO's runtime, which only then needs to be installed.
The pre- and post-processing follow `SamPredictor`: the longest side is resized to the
encoder's input size, pixels are normalised and the image is padded at the bottom right; masks
come back at the input size, are cropped to the unpadded part and resized to the image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["EdgePredictor", "resize_bilinear", "preprocess_shape", "RUNTIMES", "METADATA_KEYS"]

RUNTIMES = ("onnxruntime", "openvino")
METADATA_KEYS = ("img_size", "mask_threshold", "pixel_mean", "pixel_std")  # written by deploy.export_onnx


def preprocess_shape(h: int, w: int, longest: int) -> tuple[int, int]:
    """The (h, w) an image is resized to so its longest side is `longest` (SAM's rounding)."""
    scale = longest / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D bilinear resize with half-pixel centres."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize the first two axes of `a` to (h, w), bilinearly, like
    `F.interpolate(..., mode="bilinear", align_corners=False)` (no antialiasing)."""
    if a.shape[:2] == (h, w):
        return a.astype(np.float32, copy=False)
    a = a.astype(np.float32, copy=False)
    y0, y1, wy = _axis_weights(a.shape[0], h)
    x0, x1, wx = _axis_weights(a.shape[1], w)
    wy = wy.reshape(-1, *([1] * (a.ndim - 1)))
    rows = a[y0] * (1 - wy) + a[y1] * wy
    wx = wx.reshape(1, -1, *([1] * (a.ndim - 2)))
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


class Session:
    """One loaded model file: `run(feeds)` gives its outputs in order; `meta` its edgelab metadata."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], meta: dict[str, str]):
        self.run, self.meta = run, meta


def ort_session(path: str, threads: int | None) -> Session:
    """An ONNX file on ONNX Runtime's CPU provider."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    # idle worker threads sleep instead of spinning: a spinning pool burns the cores the rest
    # of the device (and every other model measured beside it) needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Session(lambda feeds: sess.run(None, feeds), dict(sess.get_modelmeta().custom_metadata_map))


def openvino_session(path: str, threads: int | None) -> Session:
    """An OpenVINO IR (or ONNX) file on OpenVINO's CPU plugin, latency mode, one stream.

    Precision stays FP32 where the graph is FP32 (OpenVINO would otherwise run BF16 on CPUs
    that have it); a graph quantized by NNCF keeps its INT8 layers."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(path))
    meta = {k: model.get_rt_info(["edgelab", k]).astype(str) for k in METADATA_KEYS if model.has_rt_info(["edgelab", k])}
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request.infer(feeds)
        return [request.get_tensor(o).data.copy() for o in outputs]

    return Session(run, meta)


def runtime_for(path: str, runtime: str | None = None) -> str:
    """The runtime a file runs on: `runtime` if given, else OpenVINO for `.xml` and ONNX Runtime otherwise."""
    if runtime is None:
        return "openvino" if Path(path).suffix == ".xml" else "onnxruntime"
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    return runtime


def load_session(path: str, runtime: str | None = None, threads: int | None = None) -> Session:
    """`path` loaded on its runtime (see `runtime_for`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no model file at {path}")
    return (openvino_session if runtime_for(path, runtime) == "openvino" else ort_session)(str(path), threads)


class EdgePredictor:
    """Image in, points in, masks out: SAM on ONNX Runtime or OpenVINO, without torch.

    Arguments:
        encoder: path of the image encoder's file (input `image`, (1, 3, S, S) float32).
        decoder: path of the prompt encoder + mask decoder's file (inputs
            `image_embeddings`, `point_coords` (N, K, 2), `point_labels` (N, K)).
        threads: intra-op threads of each session (None: the runtime's default).
        runtime: "onnxruntime" or "openvino" (None: by the encoder's suffix, `.xml` for OpenVINO).
    """

    def __init__(self, encoder: str, decoder: str, threads: int | None = None, runtime: str | None = None):
        self.runtime = runtime_for(str(encoder), runtime)
        self.encoder = load_session(str(encoder), self.runtime, threads)
        self.decoder = load_session(str(decoder), self.runtime, threads)
        meta = self.encoder.meta
        if "pixel_mean" not in meta:
            raise ValueError(f"{encoder} was not written by edgelab.deploy (no pixel_mean metadata)")
        self.img_size = int(meta["img_size"])
        self.mean = np.array([float(v) for v in meta["pixel_mean"].split(",")], np.float32)
        self.std = np.array([float(v) for v in meta["pixel_std"].split(",")], np.float32)
        self.mask_threshold = float(meta.get("mask_threshold", 0.0))
        self.embedding: np.ndarray | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    # ------------------------------------------------------------ image

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the encoder's (1, 3, S, S) float32 input."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        h, w = preprocess_shape(*image.shape[:2], self.img_size)
        x = (resize_bilinear(image, h, w) - self.mean) / self.std
        out = np.zeros((1, 3, self.img_size, self.img_size), np.float32)
        out[0, :, :h, :w] = x.transpose(2, 0, 1)
        return out

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The image encoder on a preprocessed (1, 3, S, S) input: the (1, C, h, w) embedding."""
        return self.encoder.run({"image": x})[0]

    def set_image(self, image: np.ndarray) -> None:
        """Run the image encoder once; prompts on this image then only cost the decoder."""
        x = self.preprocess(image)
        self.embedding = self.encode(x)
        self.original_size = image.shape[:2]
        self.input_size = preprocess_shape(*image.shape[:2], self.img_size)

    # ------------------------------------------------------------ prompts

    def _coords(self, points: np.ndarray) -> np.ndarray:
        h, w = self.original_size
        nh, nw = self.input_size
        out = np.asarray(points, np.float32).copy()
        out[..., 0] *= nw / w
        out[..., 1] *= nh / h
        return out

    def _decode(self, point_coords: np.ndarray, point_labels: np.ndarray) -> list[np.ndarray]:
        if self.embedding is None:
            raise RuntimeError("call set_image(image) before predicting")
        coords = np.asarray(point_coords, np.float32)
        labels = np.asarray(point_labels, np.float32)
        if coords.ndim == 2:
            coords, labels = coords[None], labels[None]
        if coords.shape[:2] != labels.shape or coords.shape[-1] != 2:
            raise ValueError(f"point_coords {coords.shape} and point_labels {labels.shape} do not match")
        n = coords.shape[0]
        # SamPredictor pads point-only prompts with one "not a point" (label -1)
        coords = np.concatenate([self._coords(coords), np.zeros((n, 1, 2), np.float32)], axis=1)
        labels = np.concatenate([labels, -np.ones((n, 1), np.float32)], axis=1)
        return self.decoder.run({"image_embeddings": self.embedding, "point_coords": coords, "point_labels": labels})

    def _to_image(self, masks: np.ndarray) -> np.ndarray:
        """(N, M, S, S) logits at the input size -> (N, M, H, W) bool masks of the image."""
        nh, nw = self.input_size
        masks = masks[..., :nh, :nw]
        h, w = self.original_size
        if (nh, nw) != (h, w):  # resize (N, M, h, w) as (h, w, N*M) channels
            flat = masks.reshape(-1, nh, nw).transpose(1, 2, 0)
            masks = resize_bilinear(flat, h, w).transpose(2, 0, 1).reshape(*masks.shape[:2], h, w)
        return masks > self.mask_threshold

    def predict(self, point_coords: np.ndarray, point_labels: np.ndarray,
                multimask_output: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Masks for N prompts of K points each, in image pixels (x, y).

        Arguments:
            point_coords: (N, K, 2) or (K, 2) for one prompt.
            point_labels: (N, K) or (K,): 1 foreground, 0 background.
            multimask_output: SAM's three masks per prompt (else its single mask).
        Returns:
            (masks (N, M, H, W) bool, predicted IoU (N, M)), M = 3 or 1.
        """
        _, scores, low = self._decode(point_coords, point_labels)
        pick = slice(1, None) if multimask_output else slice(0, 1)
        low, scores = low[:, pick], scores[:, pick]
        n, m, lh, lw = low.shape
        up = resize_bilinear(low.reshape(n * m, lh, lw).transpose(1, 2, 0), self.img_size, self.img_size)
        return self._to_image(up.transpose(2, 0, 1).reshape(n, m, self.img_size, self.img_size)), scores

    def segment(self, points: np.ndarray) -> np.ndarray:
        """One object per (x, y) point: the best of SAM's three masks by predicted IoU, (N, H, W).

        The decoder graph picks the best mask and upscales only it (the fast path)."""
        pts = np.asarray(points, np.float32).reshape(-1, 1, 2)
        best, _, _ = self._decode(pts, np.ones(pts.shape[:2], np.float32))
        return self._to_image(best)[:, 0]
