"""ONNX export: the graphs give PyTorch's outputs on ONNX Runtime and OpenVINO (classifier logits and sem-seg
logits within 1e-4, the same detections), contain only standard ONNX operators, keep batch and image size
dynamic; the runtimes plug into the predictor, the demo and --eval-only; bad inputs are refused clearly."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import metaspike_d2.d2 as md2
from metaspike_d2 import reparameterize
from metaspike_d2.checkpoint import save_atomic
from metaspike_d2.d2.export import ExportedModel, build_inference_model, export_detectron2_model
from metaspike_d2.d2.rpn import stable_topk
from metaspike_d2.export import export_classifier, export_onnx
from metaspike_d2.runtime import GraphSession, read_metadata

from .test_reparam import activate

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
QUICKSTART_DET = str(ROOT / "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml")
QUICKSTART_SEM = str(ROOT / "configs/quickstart/semfpn_metaspike_tiny_shapes.yaml")
RETINANET = str(ROOT / "configs/COCO-Detection/retinanet_metaspike_15m_FPN_T1.yaml")
FASTER_RCNN = str(ROOT / "configs/COCO-Detection/faster_rcnn_metaspike_15m_FPN_T1.yaml")
COCO_TINY = ["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.FPN.OUT_CHANNELS", "32", "INPUT.MIN_SIZE_TEST", "160",
             "INPUT.MAX_SIZE_TEST", "192"]
BACKENDS = ["onnxruntime", "openvino"]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _only_standard_ops(path):
    graph = onnx.load(str(path))
    domains = {node.domain for node in graph.graph.node}
    assert domains <= {"", "ai.onnx"}, f"custom operator domains in the graph: {domains}"
    return {node.op_type for node in graph.graph.node}


# ---------------------------------------------------------------------------------------------------------
# classifiers


@pytest.mark.parametrize("time_steps,spike_levels", [(1, 1), (4, 1), (1, 4)])
def test_classifier_graph_equals_pytorch(tmp_path, time_steps, spike_levels):
    model = activate(timm.create_model("metaspikeformer_tiny", num_classes=10, T=time_steps,
                                       spike_levels=spike_levels)).eval()
    path = export_classifier(model, tmp_path / "tiny.onnx", image_size=64)
    ops = _only_standard_ops(path)
    assert "Greater" in ops or "GreaterOrEqual" in ops or "Round" in ops  # the neurons are plain comparisons
    meta = read_metadata(path)
    assert meta["task"] == "classification" and meta["time_steps"] == str(time_steps)
    assert meta["spike_levels"] == str(spike_levels)
    fast = reparameterize(model, "fast")
    for backend in BACKENDS:
        session = GraphSession(path, backend, threads=1)
        for shape in [(2, 3, 64, 64), (1, 3, 96, 64)]:  # batch, height and width are dynamic
            image = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
            with torch.no_grad():
                ref = fast(image)
            assert ref.std() > 0.1  # the neurons fire: the logits depend on the image
            out = torch.from_numpy(session(image.numpy())[0])
            assert out.shape == ref.shape
            assert (out - ref).abs().max() < TOL, (backend, shape, (out - ref).abs().max())


def test_export_is_atomic_and_checks_the_suffix(tmp_path, monkeypatch):
    model = timm.create_model("metaspikeformer_tiny", num_classes=10, T=1).eval()
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_classifier(model, tmp_path / "tiny.pth", image_size=64)

    def broken(*args, **kwargs):
        Path(args[2]).write_bytes(b"partial")
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx(model, (torch.zeros(1, 3, 64, 64),), tmp_path / "tiny.onnx", input_names=["image"],
                    output_names=["logits"], dynamic_axes={})
    assert list(tmp_path.iterdir()) == []  # neither the graph nor a temporary file is left behind


def test_export_tool_for_a_classifier_checkpoint(tmp_path):
    model = activate(timm.create_model("metaspikeformer_tiny", num_classes=7, T=1, kd=True))
    save_atomic({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    tool = _load_tool("export_model")
    out = tmp_path / "tiny.onnx"
    assert tool.main(["--model", "metaspikeformer_tiny", "--checkpoint", str(tmp_path / "ckpt.pth"),
                      "--time-steps", "1", "--image-size", "64", "--output", str(out)]) == 0
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = reparameterize(model, "fast")(image)
    logits = GraphSession(out)(image.numpy())[0]
    assert logits.shape == (1, 7) and np.abs(logits - ref.numpy()).max() < TOL  # classes and kd head from the file
    with pytest.raises(SystemExit, match="--num-classes 5, but .* has 7 classes"):
        tool.main(["--model", "metaspikeformer_tiny", "--checkpoint", str(tmp_path / "ckpt.pth"), "--num-classes", "5",
                   "--time-steps", "1", "--output", str(out)])
    with pytest.raises(SystemExit, match="needs --time-steps"):
        tool.main(["--model", "metaspikeformer_tiny", "--output", str(out)])


def test_graph_session_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected an exported \.onnx graph"):
        GraphSession(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="graph backend must be one of"):
        GraphSession(tmp_path / "missing.onnx", backend="tensorrt")


# ---------------------------------------------------------------------------------------------------------
# Detectron2 models


def _d2_model(path, opts=()):
    cfg = get_cfg()
    md2.add_metaspike_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.SEM_SEG_HEAD.NORM = cfg.MODEL.SEM_SEG_HEAD.NORM.replace("SyncBN", "BN")
    torch.manual_seed(0)
    return activate(build_model(cfg)).eval(), cfg


def _assert_same_detections(ref, out):
    """Every detection of ``ref`` is in ``out`` and the reverse: same class, box within 1e-3 px, score within 1e-5
    (order among scores equal to rounding is not compared), masks equal on all but rounding pixels."""
    assert len(ref) == len(out) > 10
    a_boxes, b_boxes = ref.pred_boxes.tensor, out.pred_boxes.tensor
    close = ((a_boxes[:, None] - b_boxes[None]).abs().amax(-1) < 1e-3) \
        & ((ref.scores[:, None] - out.scores[None]).abs() < 1e-5) \
        & (ref.pred_classes[:, None] == out.pred_classes[None])
    assert bool(close.any(1).all()) and bool(close.any(0).all()), "detections differ"
    if ref.has("pred_masks"):
        match = close.float().argmax(1)
        differing = (ref.pred_masks != out.pred_masks[match]).float().mean()
        assert differing < 1e-4, differing


@pytest.mark.parametrize("config,opts,backends", [
    (QUICKSTART_DET, [], BACKENDS),                                                   # Mask R-CNN quickstart
    (FASTER_RCNN, COCO_TINY, ["onnxruntime"]),  # 80 classes: over 1000 boxes reach the NMS, many scores tie
    (RETINANET, ["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.RETINANET.NORM", "BN", "INPUT.MIN_SIZE_TEST", "128",
                 "INPUT.MAX_SIZE_TEST", "128"], ["onnxruntime"]),
], ids=["mask_rcnn", "faster_rcnn", "retinanet"])
def test_detector_graph_gives_pytorch_detections(tmp_path, config, opts, backends):
    model, cfg = _d2_model(config, opts)
    path = export_detectron2_model(model, cfg, tmp_path / "det.onnx")
    _only_standard_ops(path)
    fast = reparameterize(model, "fast")
    for backend in backends:
        graph = ExportedModel(cfg, path, backend, threads=1).eval()
        for size in [(160, 160), (128, 192)]:  # the image size is dynamic
            image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[1])) * 255
            inputs = [{"image": image, "height": 2 * size[0], "width": 2 * size[1]}]
            with torch.no_grad():
                ref, out = fast(inputs)[0]["instances"], graph(inputs)[0]["instances"]
            assert out.image_size == (2 * size[0], 2 * size[1])
            _assert_same_detections(ref, out)


def test_detector_graph_with_no_detection(tmp_path):
    """Zero boxes reach the mask head (every score under the threshold): the graph returns empty instances."""
    model, cfg = _d2_model(QUICKSTART_DET, ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32"])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 1.0
    model = build_model(cfg).eval()  # fresh weights: scores near 1 / NUM_CLASSES
    path = export_detectron2_model(model, cfg, tmp_path / "det.onnx")
    inputs = [{"image": torch.rand(3, 160, 160) * 255, "height": 80, "width": 80}]
    for backend in BACKENDS:
        out = ExportedModel(cfg, path, backend)(inputs)[0]["instances"]
        assert len(out) == 0 and out.pred_masks.shape == (0, 80, 80)


def test_semantic_fpn_graph_equals_pytorch(tmp_path):
    model, cfg = _d2_model(QUICKSTART_SEM)
    path = export_detectron2_model(model, cfg, tmp_path / "sem.onnx")
    _only_standard_ops(path)
    fast = reparameterize(model, "fast")
    for backend in BACKENDS:
        graph = ExportedModel(cfg, path, backend, threads=1).eval()
        for size in [(64, 64), (48, 80)]:
            image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[1])) * 255
            inputs = [{"image": image, "height": size[0] + 7, "width": size[1] + 5}]
            with torch.no_grad():
                ref, out = fast(inputs)[0]["sem_seg"], graph(inputs)[0]["sem_seg"]
            assert out.shape == ref.shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, size[0] + 7, size[1] + 5)
            assert ref.std() > 0 and (out - ref).abs().max() < TOL


def test_graph_refused_for_another_config_and_backend_errors(tmp_path):
    model, cfg = _d2_model(QUICKSTART_SEM)
    path = export_detectron2_model(model, cfg, tmp_path / "sem.onnx")
    other = cfg.clone()
    other.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    with pytest.raises(ValueError, match="exported with num_classes=4, the config says 5"):
        ExportedModel(other, path)
    other = cfg.clone()
    other.MODEL.METASPIKE.T = 4
    with pytest.raises(ValueError, match="time_steps=1, the config says 4"):
        ExportedModel(other, path)
    with pytest.raises(RuntimeError, match="inference only"):
        ExportedModel(cfg, path).train()([{"image": torch.zeros(3, 64, 64)}])
    cfg.MODEL.WEIGHTS = str(path)
    with pytest.raises(ValueError, match="is an exported graph: run it with --backend onnxruntime"):
        build_inference_model(cfg, "pytorch")
    cfg.MODEL.WEIGHTS = "model_final.pth"
    with pytest.raises(ValueError, match="MODEL.WEIGHTS must be a .onnx file"):
        build_inference_model(cfg, "onnxruntime")


def test_stable_topk_orders_ties_by_index():
    x = torch.tensor([[1.0, 3, 3, 2, 3, 1, 3, 0] * 40])
    values, indices = stable_topk(x, 50, dim=1)
    assert torch.equal(values, x.topk(50, dim=1).values)
    ties = indices[0][values[0] == 3]
    assert torch.equal(ties, ties.sort().values)  # equal scores keep the index order (ONNX TopK's)


# ---------------------------------------------------------------------------------------------------------
# end to end: train, export with the tool, evaluate and draw with the graph


def _sem_seg_pngs(root, n=3, size=64):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("img", "lbl"):
        (root / split).mkdir(parents=True)
    for i in range(n):
        label = np.zeros((size, size), np.uint8)
        label[:, size // 2:] = 1
        label[size // 2:, :] = 2
        image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        image[label == 1] += np.uint8(180)
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(label).save(root / "lbl" / f"{i}.png")
    (root / "classes.txt").write_text("a\nb\nc\n")
    return [str(root / "img"), str(root / "lbl"), str(root / "classes.txt")]


def test_eval_only_and_demo_with_the_exported_graph(tmp_path):
    train_net, export_tool, demo = (_load_tool(n) for n in ("train_net", "export_model", "demo"))
    data = _sem_seg_pngs(tmp_path / "data")
    register = ["--register-sem-seg", "export_e2e", *data]
    common = ["DATASETS.TRAIN", "('export_e2e',)", "DATASETS.TEST", "('export_e2e',)", "CPU_PROCESSES", "1"]
    out = tmp_path / "out"
    train_net.launch_from_args(train_net.argument_parser().parse_args([
        "--config-file", QUICKSTART_SEM, *register, *common, "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out)]))
    weights = out / "model_final.pth"
    graph = tmp_path / "sem.onnx"
    assert export_tool.main(["--config-file", QUICKSTART_SEM, "--output", str(graph), *register, *common,
                             "MODEL.WEIGHTS", str(weights)]) == 0

    def evaluate(backend, model_weights, folder):
        train_net.launch_from_args(train_net.argument_parser().parse_args([
            "--config-file", QUICKSTART_SEM, "--eval-only", "--backend", backend, *register, *common,
            "MODEL.WEIGHTS", str(model_weights), "OUTPUT_DIR", str(tmp_path / folder)]))
        log = (tmp_path / folder / "log.txt").read_text()
        return re.findall(r"copypaste: ([0-9.,]+)", log)[-1]

    assert evaluate("onnxruntime", graph, "eval_ort") == evaluate("pytorch", weights, "eval_pt")
    with pytest.raises(SystemExit, match="for evaluation only: add --eval-only"):
        train_net.launch_from_args(train_net.argument_parser().parse_args([
            "--config-file", QUICKSTART_SEM, "--backend", "onnxruntime", "MODEL.WEIGHTS", str(graph)]))

    demo.main(["--config-file", QUICKSTART_SEM, "--input", str(tmp_path / "data" / "img" / "0.png"), "--output",
               str(tmp_path / "vis") + "/", "--backend", "openvino", *register, "--opts", *common,
               "MODEL.WEIGHTS", str(graph)])
    assert (tmp_path / "vis" / "0.png").exists()
