"""Compressors over stacked rows ``[N, P]``, selectable by name, exact about bytes.

Registered (see ``docs/compression.md``): ``none``, ``topk``, ``randk``, ``threshold``,
``qsgd``, ``quantize``, ``sign``, ``powersgd``, ``lgreco``, ``rqm``, ``countsketch``. Stateful
schemes are pure functions over caller-held memory: :func:`error_feedback`, :func:`ef21`,
:func:`dgc_step` and FetchSGD's server step :func:`fetchsgd_step`.
"""

from gossamer.compression.adaptive import LGreCo, choose_assignment
from gossamer.compression.base import COMPRESSORS, Compressor, Encoded, build_compressor
from gossamer.compression.dgc import DGCStep, dgc_density, dgc_nominal_bytes, dgc_step
from gossamer.compression.feedback import ef21, ef21_receive, error_feedback
from gossamer.compression.powersgd import PowerSGD
from gossamer.compression.qsgd import QSGD
from gossamer.compression.quantize import Quantize, ScaledSign
from gossamer.compression.rqm import RQM
from gossamer.compression.sketch import CountSketch, FetchSGDStep, fetchsgd_step
from gossamer.compression.sparse import Identity, RandK, Threshold, TopK

__all__ = [
    "COMPRESSORS", "Compressor", "CountSketch", "DGCStep", "Encoded", "FetchSGDStep", "Identity",
    "LGreCo", "PowerSGD", "QSGD", "Quantize", "RQM", "RandK", "ScaledSign", "Threshold", "TopK",
    "build_compressor", "choose_assignment", "dgc_density", "dgc_nominal_bytes", "dgc_step", "ef21",
    "ef21_receive", "error_feedback", "fetchsgd_step",
]
