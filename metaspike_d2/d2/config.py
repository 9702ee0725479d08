"""Detectron2 config keys of metaspike-d2: ``add_metaspike_config(cfg)``.

Every key is documented where it is defined (this file is the single reference; docs/detection.md
renders the same list). Call it right after ``get_cfg()``, before ``merge_from_file``.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_metaspike_config"]


def add_metaspike_config(cfg: CN) -> None:
    """Add the ``MODEL.METASPIKE`` node and the solver / input keys used by metaspike-d2 (in place)."""
    _C = cfg

    # ------------------------------------------------------------------------------------------
    # Backbone: Meta-SpikeFormer (metaspike_d2.backbone.MetaSpikeFormer)
    # ------------------------------------------------------------------------------------------
    _C.MODEL.METASPIKE = CN()
    # A key of metaspike_d2.backbone.VARIANTS: "tiny", "15m", "31m", "55m", "123m".
    _C.MODEL.METASPIKE.VARIANT = "15m"
    # Explicit stage widths [C0, C1, C2, C3]; when non-empty it replaces VARIANT.
    _C.MODEL.METASPIKE.WIDTHS = []
    # Time steps T (direct encoding: the image is presented T times). T=1 and T=4 are the paper's settings.
    _C.MODEL.METASPIKE.T = 1
    # SDSA heads in stages 3 and 4.
    _C.MODEL.METASPIKE.NUM_HEADS = 8
    # D, the largest spike count of a neuron per time step, for the backbone, the spiking neck and heads:
    # 1 = binary LIF neurons (the paper); >= 2 = integer I-LIF neurons (SpikeYOLO: counts 0..D, binary D
    # events each at inference, metaspike_d2.expand_spikes). Stored with the backbone's weights and checked.
    _C.MODEL.METASPIKE.SPIKE_LEVELS = 1
    # Stochastic depth over the 8 transformer blocks (rate rises linearly to this value).
    _C.MODEL.METASPIKE.DROP_PATH_RATE = 0.0
    # Stride of the stage-4 downsample: 2 puts stage 4 at stride 32 (features at 4/8/16/32, the
    # detection default); 1 is the paper's backbone (stage 4 at stride 16, like stage 3), in which
    # case the FPN must be built from features at 4/8/16 (e.g. stage1, stage2, stage4).
    _C.MODEL.METASPIKE.STAGE4_STRIDE = 2
    # Features the bottom-up backbone returns (subset of stem/stage1/stage2/stage3/stage4;
    # strides 2/4/8/16/16*STAGE4_STRIDE). FPN backbones read MODEL.FPN.IN_FEATURES from these.
    _C.MODEL.METASPIKE.OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]
    # One switch for the whole detector after the backbone:
    #   True  -> spiking FPN keeping T (LIF before every lateral/output conv) and spiking heads
    #            (registered names MetaSpike*), logits averaged over T;
    #   False -> the backbone features are averaged over T, then Detectron2's stock FPN and heads.
    _C.MODEL.METASPIKE.SPIKING_HEADS = True
    # RoIAlign implementation of the box and mask poolers (MODEL.ROI_*_HEAD.POOLER_TYPE "ROIAlign" or
    # "ROIAlignV2"): "torchvision" (Detectron2's ROIAlign, the default) or "matmul"
    # (metaspike_d2/d2/roi_align.py: the same sampling as two matrix products, 4.8x faster forward +
    # backward on the CPU at the quickstart's p2, docs/benchmarks.md Table F; its work grows with the map's
    # area, so keep "torchvision" for COCO-sized inputs and on GPUs).
    _C.MODEL.METASPIKE.ROI_ALIGN_KERNEL = "torchvision"
    # Neurons of the spiking neck and heads. (The backbone's neuron settings are part of its weights:
    # metaspike_d2.backbone.NEURON_SETTINGS; new backbones fire at V_th 0.5, converted original ones at 1.0.)
    _C.MODEL.METASPIKE.NEURON = CN()
    # Firing threshold V_th (at T=1 a neuron fires iff its input >= tau * V_th = 1: ~16% of normalized
    # inputs at initialization; the original's 1.0 fires ~2% and wakes up slowly from scratch).
    _C.MODEL.METASPIKE.NEURON.V_THRESHOLD = 0.5
    # Membrane time constant tau (> 1).
    _C.MODEL.METASPIKE.NEURON.TAU = 2.0
    # Steepness alpha of the sigmoid surrogate gradient.
    _C.MODEL.METASPIKE.NEURON.SURROGATE_ALPHA = 4.0

    # Inference re-parameterization (metaspike_d2.reparameterize, docs/benchmarks.md), applied after the
    # weights are loaded by MetaSpikePredictor (so tools/demo.py) and tools/train_net.py --eval-only,
    # never in training: "" (off), "fast" (every BN folded into its conv, RepConv as 1x1 -> dw 3x3 -> 1x1;
    # same outputs to ~1e-6, the fastest form) or "spike" (every conv driven by spikes, the form of the
    # paper's energy accounting; more multiply-adds).
    _C.MODEL.METASPIKE.REPARAM_INFERENCE = ""

    # torch intra-op threads for CPU runs (applied by tools/train_net.py and tools/demo.py); 0 keeps
    # torch's default. 1 avoids OpenMP oversubscription on small, busy machines (the CPU quickstart).
    _C.CPU_THREADS = 0
    # Processes tools/train_net.py launches when MODEL.DEVICE is "cpu" and --num-gpus is not given: N > 1
    # trains data-parallel (gloo, DistributedDataParallel) with SOLVER.IMS_PER_BATCH split over them, each
    # process using CPU_THREADS threads. --num-gpus, when given, overrides it.
    _C.CPU_PROCESSES = 1

    # ------------------------------------------------------------------------------------------
    # Solver additions (used by metaspike_d2.d2.solver)
    # ------------------------------------------------------------------------------------------
    # "SGD" (Detectron2's default optimizer) or "ADAMW" (the original's); norms and biases never get
    # weight decay with ADAMW (SOLVER.WEIGHT_DECAY_NORM / WEIGHT_DECAY_BIAS are ignored for it).
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW betas.
    _C.SOLVER.BETAS = (0.9, 0.999)
    # End value of "WarmupLinearLR" (a multiplier of BASE_LR reached at MAX_ITER), as the original's
    # LinearLR(1 -> 0.01).
    _C.SOLVER.LINEAR_END_FACTOR = 0.01

    # ------------------------------------------------------------------------------------------
    # Input additions (used by metaspike_d2.data.build_detection_augmentation)
    # ------------------------------------------------------------------------------------------
    # DETR-style "resize -> crop -> resize" training augmentation: when non-empty and
    # INPUT.CROP.ENABLED, the image is first resized so its shorter side is one of these sizes
    # (max INPUT.MAX_SIZE_TRAIN), then cropped with INPUT.CROP.TYPE/SIZE, then resized with
    # INPUT.MIN_SIZE_TRAIN. Empty keeps Detectron2's behaviour (crop first, then resize).
    _C.INPUT.CROP.PRE_RESIZE_MIN_SIZE = []

    # --- semantic segmentation ---------------------------------------------------------------
    # (metaspike_d2.d2.sem_seg, metaspike_d2.data.sem_seg_augmentation, WarmupPolyLR in the solver)
    # ------------------------------------------------------------------------------------------
    _C.MODEL.METASPIKE.SEM_SEG = CN()
    # How T reaches the neck of build_metaspike_sem_seg_fpn_backbone (it replaces SPIKING_HEADS there):
    # "mean": every backbone stage is averaged over T, then neck and head run one time step (the
    # original's decode_mode 'snn'); "spiking": (T, B, C, H, W) is kept through neck and head, and the
    # logits are averaged over T.
    _C.MODEL.METASPIKE.SEM_SEG.TIME_MODE = "mean"
    # Dropout2d before the classifier of SpikeSemSegFPNHead (the original: 0.1).
    _C.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    # Per-class weights of SpikeSemSegFPNHead's cross-entropy: "" (none, the original's) or "median_frequency"
    # (w_c = median(f) / f_c over DATASETS.TRAIN's label maps, read once when the model is built; lets small,
    # rare classes such as poles and pedestrians be learnt at all on small datasets).
    _C.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = ""
    # Learning-rate multipliers as [[substring, factor], ...]: a parameter whose full name contains the
    # substring gets BASE_LR * factor (the first match wins), like mmseg's paramwise custom_keys; e.g.
    # [["sem_seg_head.", 2.0], ["backbone.lateral_convs.", 2.0]]. Used by the ADAMW optimizer.
    _C.SOLVER.LR_MULTIPLIERS = []
    # "WarmupPolyLR" schedule (Detectron2's DeepLab project): lr = BASE_LR * (1 - iter / MAX_ITER) ** POWER
    # after the warm-up, held at POLY_LR_CONSTANT_ENDING * BASE_LR once it falls below that.
    _C.SOLVER.POLY_LR_POWER = 0.9
    _C.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # Semantic-segmentation training crop: at most this fraction of the crop may be a single category
    # (mmseg's cat_max_ratio; 1.0 disables the check). Used by RandomCrop_CategoryAreaConstraint.
    _C.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Photometric distortion (brightness, contrast, saturation, hue; mmseg's PhotoMetricDistortion).
    _C.INPUT.COLOR_AUG_SSD = False

    # ---- Firing-rate logging (metaspike_d2/d2/energy_hook.py, docs/energy.md) ----------
    # Every this many training iterations, FiringRateHook records that iteration's spikes and puts the
    # mean firing rate of each stage's neurons (stem, stage1..4, neck, proposal_generator, roi_heads,
    # sem_seg_head, ...) into the event storage as "firing_rate/<stage>" (TensorBoard, metrics.json).
    # 0 disables it.
    _C.MODEL.METASPIKE.FIRING_RATE_PERIOD = 0
    # ---- end of firing-rate logging --------------------------------------------------------------

    # ---- Robustness (metaspike_d2/d2/engine.py, docs/troubleshooting.md) ----------------
    # Normalization of the Meta-SpikeFormer backbone in training: "BN" (per-process BatchNorm) or "SyncBN"
    # (every backbone BatchNorm, BN-and-pad included, synchronized across processes; GPUs only: a
    # multi-process CPU run with SyncBN is refused at build time).
    _C.MODEL.METASPIKE.NORM = "BN"
    # Training only: skip (and count, with a logged warning naming the file) images that cannot be read
    # (corrupt, truncated, missing) instead of stopping (metaspike_d2.data.image_io.RobustDatasetMapper).
    # Evaluation never skips.
    _C.DATALOADER.SKIP_BAD_IMAGES = False
    # MODEL.WEIGHTS (full detector checkpoints) in training: False refuses a file whose keys or shapes differ
    # from the model, listing them; True loads only the matching tensors (Detectron2's behaviour, e.g. to
    # fine-tune with another NUM_CLASSES), the differences logged as warnings. --eval-only is always strict.
    _C.MODEL.METASPIKE.ALLOW_PARTIAL_WEIGHTS = False
    # ---- end of robustness -----------------------------------------------------------------------

    # ---- Weight averaging (metaspike_d2/d2/ema.py) -------------------------------------------------
    # An exponential moving average of the weights (parameters and buffers), updated every iteration;
    # after the last iteration it replaces the training weights, so model_final.pth and the final
    # evaluation hold the average. Periodic checkpoints store it as "model_ema" (--resume continues it).
    _C.MODEL_EMA = CN()
    _C.MODEL_EMA.ENABLED = False
    # Upper bound of the decay; the decay used at step s is min(DECAY, 1 - (1 + s) ** -0.75) (timm's
    # warm-up), which is 0.9973 after 2600 steps and reaches 0.998 after about 4000.
    _C.MODEL_EMA.DECAY = 0.998


def maybe_reparameterize(cfg, model):
    """Apply ``MODEL.METASPIKE.REPARAM_INFERENCE`` ("" = off, "fast", "spike") to an inference model,
    in place (eval mode); returns the model."""
    mode = cfg.MODEL.METASPIKE.get("REPARAM_INFERENCE", "") if "METASPIKE" in cfg.MODEL else ""
    if not mode:
        return model
    from ..reparam import reparameterize

    return reparameterize(model, mode.lower(), inplace=True)
