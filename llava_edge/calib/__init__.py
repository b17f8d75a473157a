"""Calibration and precision: int8, int4 and fp16 copies of an exported fp32 model dir.

quantize.py writes them (`llava-edge quantize`; fp16.py converts graphs of any size to fp16),
data.py gathers what the fp32 graphs are fed, report.py measures the copies against fp32,
trt_check.py checks that TensorRT 10.3 would take their TensorRT forms. docs/quantization.md explains the forms and the figures.
"""

from llava_edge.calib.data import Sample, load_samples
from llava_edge.calib.quantize import quantize_model
from llava_edge.calib.report import build_report
from llava_edge.calib.trt_check import check_graph, check_model_dir

__all__ = [
    "Sample",
    "build_report",
    "check_graph",
    "check_model_dir",
    "load_samples",
    "quantize_model",
]
