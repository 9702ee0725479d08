#!/usr/bin/env python
"""Run a metaspike-d2 model on images, a video or a webcam and draw the results (Detectron2's demo).

    python tools/demo.py --config-file configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml \
        --input datasets/metaspike_shapes_v1/val/000000.png --output out/ \
        --opts MODEL.WEIGHTS output/quickstart_mask_rcnn_metaspike_tiny_shapes/model_final.pth

An exported graph (``tools/export_model.py``) runs the same way with ``--backend onnxruntime`` (or ``openvino``)
and ``--opts MODEL.WEIGHTS model.onnx``.

A model trained on one's own data: register its test set as for training (``--register-voc`` etc., before
``--opts``), so that the class count and the class names drawn come from it (DATASETS.TEST defaults to the
last registered dataset).
"""
import argparse
import glob
import os
import sys
import time

import cv2
import torch
import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from metaspike_d2.d2 import add_metaspike_config  # noqa: E402
from metaspike_d2.data import own_data  # noqa: E402
from metaspike_d2.data.image_io import read_image  # noqa: E402  (grayscale/RGBA/palette/16-bit -> BGR)
from metaspike_d2.d2.export import INFERENCE_BACKENDS  # noqa: E402
from metaspike_d2.d2.predictor import VisualizationDemo  # noqa: E402

WINDOW_NAME = "metaspike-d2"


def setup_cfg(args):
    names = own_data.register_from_args(args)
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if names and "DATASETS.TEST" not in args.opts[0::2]:  # the class names drawn are DATASETS.TEST[0]'s
        cfg.DATASETS.TEST = (names[-1],)
    cfg.merge_from_list(own_data.dataset_config_overrides(cfg, args.opts))  # NUM_CLASSES unless given
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    if cfg.CPU_THREADS > 0:
        torch.set_num_threads(cfg.CPU_THREADS)
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="metaspike-d2 demo")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument("--webcam", action="store_true", help="take inputs from the webcam")
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument("--input", nargs="+", help="image paths, or a single glob pattern such as 'dir/*.jpg'")
    parser.add_argument("--output", help="file or directory for the visualizations (video: a file); "
                                         "without it, results are shown in an OpenCV window")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to show")
    parser.add_argument("--backend", choices=INFERENCE_BACKENDS, default="pytorch",
                        help="pytorch (MODEL.WEIGHTS a checkpoint) or the runtime of an exported graph "
                             "(MODEL.WEIGHTS a .onnx file from tools/export_model.py)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return own_data.add_dataset_arguments(parser)


def _output_path(output: str, input_path: str, many: bool) -> str:
    if os.path.isdir(output) or many or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(input_path))
    return output


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="metaspike_demo")
    cfg = setup_cfg(args)
    own_data.log_summary(cfg, args.opts, logger)
    demo = VisualizationDemo(cfg, backend=args.backend)

    if args.input:
        paths = glob.glob(os.path.expanduser(args.input[0])) if len(args.input) == 1 else args.input
        if not paths:
            raise FileNotFoundError(f"no input image matches {args.input}")
        for path in tqdm.tqdm(paths, disable=not args.output):
            img = read_image(path, format="BGR")
            start = time.time()
            predictions, visualized = demo.run_on_image(img)
            n = len(predictions["instances"]) if "instances" in predictions else 0
            logger.info(f"{path}: {n} instances in {time.time() - start:.2f}s")
            if args.output:
                visualized.save(_output_path(args.output, path, len(paths) > 1))
            else:
                cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
                cv2.imshow(WINDOW_NAME, visualized.get_image()[:, :, ::-1])
                if cv2.waitKey(0) == 27:
                    break
    elif args.webcam or args.video_input:
        if args.webcam and args.video_input:
            raise ValueError("give either --webcam or --video-input")
        video = cv2.VideoCapture(0 if args.webcam else args.video_input)
        writer = None
        if args.output:
            if args.webcam:
                raise ValueError("--output is not supported with --webcam")
            fps = video.get(cv2.CAP_PROP_FPS) or 25
            size = (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        for frame in demo.run_on_video(video):
            if writer is not None:
                writer.write(frame)
            else:
                cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
                cv2.imshow(WINDOW_NAME, frame)
                if cv2.waitKey(1) == 27:
                    break
        video.release()
        if writer is not None:
            writer.release()
        cv2.destroyAllWindows()
    else:
        raise SystemExit("nothing to do: give --input, --video-input or --webcam")


if __name__ == "__main__":
    main()
