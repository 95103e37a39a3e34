"""The kernel-time attribution of ``sgl-ray bench step-profile`` (pure functions; the GPU run is in
tests/gpu/test_gpu_engine.py)."""

from __future__ import annotations

import json

import pytest

from sgl_ray.bench.step_profile import KernelSpan, attribute, kernel_label, read_trace


def test_overlapping_kernels_are_charged_what_they_add():
    spans = [
        KernelSpan("a", 0.0, 10.0),
        KernelSpan("b", 8.0, 15.0),  # starts under a (a dependent launch): charged 5
        KernelSpan("c", 9.0, 12.0),  # wholly under a and b: charged nothing
        KernelSpan("a", 20.0, 30.0),  # after 5 idle
    ]
    att = attribute(spans)
    got = {s.label: (s.count, s.charged_us, s.duration_us) for s in att.shares}
    assert got == {"a": (2, 20.0, 20.0), "b": (1, 5.0, 7.0), "c": (1, 0.0, 3.0)}
    assert att.idle_us == 5.0 and att.window_us == 30.0
    assert [s.label for s in att.shares] == ["a", "b", "c"]
    assert sum(s.charged_us for s in att.shares) + att.idle_us == att.window_us


def test_attribution_ignores_the_order_spans_come_in():
    spans = [KernelSpan("x", 5.0, 6.0), KernelSpan("y", 0.0, 4.0)]
    att = attribute(spans)
    assert att.idle_us == 1.0 and att.window_us == 6.0
    assert attribute([]).shares == []


@pytest.mark.parametrize(
    "name,grid,want",
    [
        ("_gemv_kernel", [1536, 1, 1], "_gemv_kernel [1536x1x1]"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
            "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
            None,
            "vectorized_elementwise_kernel",
        ),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_64x1_tn_align8>(Params)",
         [4, 2, 1], "Kernel2 [4x2x1]"),
    ],
)  # fmt: skip
def test_kernel_labels_are_short_and_keep_the_grid(name, grid, want):
    assert kernel_label(name, grid) == want


def test_read_trace_takes_device_events_only(tmp_path):
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "_rmsnorm_kernel", "ts": 100.0, "dur": 2.5, "args": {"grid": [1, 1, 1]}},
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 90.0, "dur": 1.0},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 80.0, "dur": 5.0},
            {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
        ]
    }  # fmt: skip
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    spans = read_trace(str(path))
    assert spans == [
        KernelSpan("_rmsnorm_kernel [1x1x1]", 100.0, 102.5),
        KernelSpan("Memcpy HtoD (Pinned -> Device)", 90.0, 91.0),
    ]
