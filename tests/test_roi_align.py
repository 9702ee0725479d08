"""The matmul RoIAlign (metaspike_d2/d2/roi_align.py) against torchvision's op, and its config switch."""
import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from torchvision.ops import roi_align

from metaspike_d2.d2.roi_align import MatmulROIAlign, roi_align_matmul
from metaspike_d2.d2.roi_heads import _select_roi_align

from .test_d2_heads import MASK, make_cfg


def _rois(num, image_size, num_images, generator):
    """RoIs of every kind: inside, crossing and beyond the border, tiny, zero-sized and inverted."""
    b = torch.randint(0, num_images, (num, 1), generator=generator).double()
    xy = torch.rand(num, 2, generator=generator, dtype=torch.float64) * (image_size + 40) - 20
    wh = torch.rand(num, 2, generator=generator, dtype=torch.float64) * image_size * 0.7
    rois = torch.cat([b, xy, xy + wh], 1)
    rois[:3, 3:] = rois[:3, 1:3]            # zero width and height
    rois[3:5, 3:] = rois[3:5, 1:3] - 3.0    # x2 < x1, y2 < y1
    rois[5, 1:] = torch.tensor([0.0, 0.0, image_size, image_size], dtype=torch.float64)  # the whole image
    rois[6, 1:] = torch.tensor([image_size - 2.0, 3.0, image_size + 30.0, 9.0], dtype=torch.float64)  # past the edge
    return rois


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("size,scale", [((40, 40), 0.25), ((13, 17), 0.125)])
def test_matches_torchvision_forward_and_backward(sampling_ratio, aligned, size, scale):
    g = torch.Generator().manual_seed(sampling_ratio * 7 + int(aligned))
    features = torch.randn(3, 5, *size, dtype=torch.float64, generator=g, requires_grad=True)
    rois = _rois(60, size[1] / scale, 2, g)  # image 2 gets no RoI
    expected = roi_align(features, rois, (7, 6), scale, sampling_ratio, aligned)
    ours = roi_align_matmul(features, rois, (7, 6), scale, sampling_ratio, aligned)
    assert ours.shape == expected.shape == (60, 5, 7, 6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    (our_grad,) = torch.autograd.grad(ours, features, grad_out)
    torch.testing.assert_close(our_grad, expected_grad, rtol=0, atol=1e-12)
    assert our_grad[2].abs().sum() == 0 and our_grad[:2].abs().sum() > 0


def test_float32_rois_order_and_empty_input():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 20, 20, generator=g)
    rois = _rois(30, 80, 2, g).float()
    rois = rois[torch.randperm(30, generator=g)]  # images interleaved: outputs keep the RoI order
    torch.testing.assert_close(roi_align_matmul(features, rois, 7, 0.25, 0, True),
                               roi_align(features, rois, 7, 0.25, 0, True), rtol=1e-5, atol=1e-5)
    assert roi_align_matmul(features, rois[:0], 7, 0.25, 0, True).shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match=r"rois \(R, 5\)"):
        roi_align_matmul(features, rois[:, :4], 7, 0.25, 0, True)


def test_config_switch_swaps_the_level_poolers():
    torchvision_model = build_model(make_cfg(MASK))
    matmul_model = build_model(make_cfg(MASK, "MODEL.METASPIKE.ROI_ALIGN_KERNEL", "matmul"))
    for model, kind in ((torchvision_model, ROIAlign), (matmul_model, MatmulROIAlign)):
        for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
            levels = pooler.pooler.level_poolers
            assert len(levels) == 4 and all(type(level) is kind for level in levels)
    ours, theirs = matmul_model.roi_heads.box_pooler.pooler.level_poolers, torchvision_model.roi_heads.box_pooler.pooler.level_poolers
    for a, b in zip(ours, theirs):
        assert (a.output_size, a.spatial_scale, a.sampling_ratio, a.aligned) == \
               (b.output_size, b.spatial_scale, b.sampling_ratio, b.aligned)


def test_config_switch_rejects_unknown_kernels_and_pooler_types():
    pooler = build_model(make_cfg(MASK)).roi_heads.box_pooler.pooler
    with pytest.raises(ValueError, match="ROI_ALIGN_KERNEL must be 'torchvision' or 'matmul', got 'cuda'"):
        _select_roi_align(pooler, "cuda")
    pool_model_cfg = make_cfg(MASK, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool", "MODEL.METASPIKE.ROI_ALIGN_KERNEL", "matmul")
    with pytest.raises(ValueError, match="needs POOLER_TYPE 'ROIAlign' or 'ROIAlignV2'.*RoIPool"):
        build_model(pool_model_cfg)
