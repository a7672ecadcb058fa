"""Benchmark pieces that need no run: the FLOP count behind bench/training.py's GFLOP/s
figures, and bench/allreduce.py's fit of the ring-allreduce cost model."""
import model as unet
from bench.training import forward_flops_per_slice


def test_forward_flops_count_every_convolution():
    net = unet.build_unet(image_size=8, channels=2, num_classes=1, base_filters=4, depth=1)
    # down0: 8x8 grid, 3x3 kernels 2->4 and 4->4; bottleneck: 4x4, 4->8 and 8->8;
    # transposed 2x2 8->4 applied per 4x4 input pixel; up0: 8x8, (4+4)->4 and 4->4; 1x1 4->1.
    multiply_adds = (64 * 9 * (2 * 4 + 4 * 4) + 16 * 9 * (4 * 8 + 8 * 8) + 16 * 4 * 8 * 4
                     + 64 * 9 * (8 * 4 + 4 * 4) + 64 * 4)
    assert forward_flops_per_slice(net) == 2 * multiply_adds


def test_ring_model_fit_recovers_latency_and_bandwidth():
    """bench/allreduce.py: from times made by the ring model itself, the least-squares fit
    returns its alpha and beta."""
    from bench.allreduce import fit_ring_model, ring_seconds
    alpha, beta = 2e-4, 1.1e8  # 0.2 ms per message, 0.88 Gbit/s
    points = [(n, size, ring_seconds(n, alpha, beta, size))
              for n in (2, 3) for size in (4, 500_000, 2_000_000, 7_800_000)]
    fitted_alpha, fitted_beta = fit_ring_model(points)
    assert abs(fitted_alpha - alpha) < 1e-9 and abs(fitted_beta / beta - 1) < 1e-9
