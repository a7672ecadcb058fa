"""bench/training.py pieces that need no run: the FLOP count behind its GFLOP/s figures."""
import model as unet
from bench.training import forward_flops_per_slice


def test_forward_flops_count_every_convolution():
    net = unet.build_unet(image_size=8, channels=2, num_classes=1, base_filters=4, depth=1)
    # down0: 8x8 grid, 3x3 kernels 2->4 and 4->4; bottleneck: 4x4, 4->8 and 8->8;
    # transposed 2x2 8->4 applied per 4x4 input pixel; up0: 8x8, (4+4)->4 and 4->4; 1x1 4->1.
    multiply_adds = (64 * 9 * (2 * 4 + 4 * 4) + 16 * 9 * (4 * 8 + 8 * 8) + 16 * 4 * 8 * 4
                     + 64 * 9 * (8 * 4 + 4 * 4) + 64 * 4)
    assert forward_flops_per_slice(net) == 2 * multiply_adds
