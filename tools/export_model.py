#!/usr/bin/env python
"""Export a re-parameterized metaspike-d2 model to ONNX (static T, dynamic batch and image size), then check
the graph against PyTorch on ONNX Runtime.

    # a classifier: a timm name, optionally its checkpoint (classification/train.py, or a converted original)
    python tools/export_model.py --model metaspikeformer_55m --checkpoint checkpoint-best.pth --time-steps 4 \\
        --output metaspikeformer_55m_t4.onnx
    # a Detectron2 model (Mask R-CNN, Faster R-CNN, RetinaNet, Semantic FPN) from its config and MODEL.WEIGHTS
    python tools/export_model.py --config-file configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml \\
        --output mask_rcnn.onnx MODEL.WEIGHTS output/quickstart_mask_rcnn_metaspike_tiny_shapes/model_final.pth

Run the graph with ``tools/demo.py --backend onnxruntime`` or ``tools/train_net.py --eval-only --backend
onnxruntime`` (``MODEL.WEIGHTS`` the .onnx file); docs/deployment.md has the details and speeds.
Own-data models: register the dataset as for training (``--register-voc`` etc.) so the class count matches.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import metaspike_d2  # noqa: E402,F401  (registers the timm models)
from metaspike_d2.checkpoint import extract_state_dict, load_checkpoint_file, load_state_dict_strict  # noqa: E402
from metaspike_d2.export import DEFAULT_OPSET, export_classifier  # noqa: E402
from metaspike_d2.reparam import reparameterize  # noqa: E402
from metaspike_d2.runtime import GraphSession  # noqa: E402

logger = logging.getLogger("metaspike_export")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="TIMM_NAME", help="a classifier, e.g. metaspikeformer_55m")
    source.add_argument("--config-file", metavar="FILE", help="a Detectron2 config (weights from MODEL.WEIGHTS)")
    parser.add_argument("--output", required=True, metavar="FILE.onnx", help="the graph to write")
    parser.add_argument("--checkpoint", metavar="FILE", help="classifier weights (default: random initialization)")
    parser.add_argument("--num-classes", type=int, help="classifier classes (default: from --checkpoint, else 1000)")
    parser.add_argument("--time-steps", type=int, help="T of the classifier (required with --model; Detectron2: "
                                                      "MODEL.METASPIKE.T)")
    parser.add_argument("--spike-levels", type=int, help="classifier D (default: from --checkpoint, else 1)")
    parser.add_argument("--image-size", type=int, default=224, help="classifier trace size (the graph takes any)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch on ONNX Runtime")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="Detectron2 config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    from metaspike_d2.data import own_data  # registration flags as in train_net.py (Detectron2 needed then)

    return own_data.add_dataset_arguments(parser)


def _classifier(args):
    import timm

    if args.time_steps is None:
        raise SystemExit("--model needs --time-steps T (the graph unrolls T; export one graph per T)")
    state, kwargs = None, {}
    if args.checkpoint:
        state = extract_state_dict(load_checkpoint_file(args.checkpoint), source=args.checkpoint)
        if "head.weight" not in state:
            raise SystemExit(f"{args.checkpoint}: no 'head.weight' (a backbone-only file?); export a classifier "
                             "checkpoint, or a Detectron2 model with --config-file")
        kwargs["num_classes"] = state["head.weight"].shape[0]
        kwargs["kd"] = "head_kd.weight" in state
        if "spike_levels" in state:
            kwargs["spike_levels"] = int(state["spike_levels"])
    if args.num_classes is not None:
        if "num_classes" in kwargs and kwargs["num_classes"] != args.num_classes:
            raise SystemExit(f"--num-classes {args.num_classes}, but {args.checkpoint} has {kwargs['num_classes']} classes")
        kwargs["num_classes"] = args.num_classes
    if args.spike_levels is not None:
        kwargs["spike_levels"] = args.spike_levels  # a mismatch with the checkpoint is refused on load
    model = timm.create_model(args.model, T=args.time_steps, **kwargs)
    if state is not None:
        load_state_dict_strict(model, state, source=args.checkpoint)
    return model.eval()


def _verify_classifier(model, path, size):
    fast = reparameterize(model, "fast")
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fast(image).numpy()
    out = GraphSession(path, "onnxruntime")(image.numpy())[0]
    diff = float(np.abs(out - ref).max())
    logger.info("check on ONNX Runtime (2 random images of %d px): max |logit difference| %.3g, same top-1: %s",
                size, diff, bool((out.argmax(1) == ref.argmax(1)).all()))
    return diff


def _detectron2(args):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from metaspike_d2.d2 import MetaSpikeCheckpointer, add_metaspike_config
    from metaspike_d2.data import own_data

    if args.checkpoint or args.num_classes or args.time_steps or args.spike_levels:
        raise SystemExit("--checkpoint / --num-classes / --time-steps / --spike-levels are classifier options; with "
                         "--config-file give MODEL.WEIGHTS, MODEL.METASPIKE.T ... as KEY VALUE overrides")
    own_data.register_from_args(args)
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.merge_from_list(own_data.dataset_config_overrides(cfg, args.opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialized model")
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        MetaSpikeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model, cfg


def _verify_detectron2(model, cfg, path):
    from metaspike_d2.d2.export import ExportedModel

    fast = reparameterize(model, cfg.MODEL.METASPIKE.REPARAM_INFERENCE or "fast")
    side = min(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image, "height": side, "width": side}]
    with torch.no_grad():
        ref, out = fast(inputs)[0], ExportedModel(cfg, path).eval()(inputs)[0]
    if "sem_seg" in ref:
        diff = float((ref["sem_seg"] - out["sem_seg"]).abs().max())
        logger.info("check on ONNX Runtime (a random %d px image): max |logit difference| %.3g", side, diff)
        return diff
    a, b = ref["instances"], out["instances"]
    same = len(a) == len(b) and bool((a.pred_classes == b.pred_classes).all())
    diff = float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()) if same and len(a) else 0.0
    logger.info("check on ONNX Runtime (a random %d px image): %d vs %d detections, max |box difference| %.3g px",
                side, len(a), len(b), diff)
    return diff if same else float("inf")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = get_parser().parse_args(argv)
    if not args.output.endswith(".onnx"):
        raise SystemExit(f"--output must end in .onnx, got {args.output!r}")
    start = time.time()
    if args.model:
        model = _classifier(args)
        export_classifier(model, args.output, image_size=args.image_size, opset=args.opset)
    else:
        from metaspike_d2.d2.export import export_detectron2_model

        model, cfg = _detectron2(args)
        export_detectron2_model(model, cfg, args.output, reparam=cfg.MODEL.METASPIKE.REPARAM_INFERENCE or "fast",
                                opset=args.opset)
    logger.info("wrote %s (%.1f MB) in %.1f s", args.output, os.path.getsize(args.output) / 2**20, time.time() - start)
    if args.no_verify:
        return 0
    diff = _verify_classifier(model, args.output, args.image_size) if args.model else _verify_detectron2(model, cfg, args.output)
    if not diff <= 1e-3:
        logger.error("the graph's outputs differ from PyTorch's (%.3g): a value within float rounding of a firing "
                     "threshold can flip a spike; compare on real images with --eval-only before deploying", diff)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
