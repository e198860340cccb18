"""The original model on onnxruntime, created exactly as the user asked onnxruntime for it.

:class:`fastrun.InferenceSession` keeps one such session per model: shapes without a plan, feeds
a plan does not take as they are, device execution providers, and every onnxruntime method a plan
has no equivalent of run on it, so that they behave as onnxruntime does, errors included. It is
made with the user's ``sess_options``, ``providers``, ``provider_options`` and keyword arguments,
unchanged; only when it is made is fastrun's choice (:meth:`OriginalModel.session`).
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from fastrun.system import ortutil

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
# Providers that compute on this CPU, or not at all (Azure calls a remote endpoint, and the CPU
# wheel lists it as available): with only these requested, fastrun's CPU plans apply.
HOST_PROVIDERS = frozenset({CPU_PROVIDER, "AzureExecutionProvider"})


def provider_names(providers: Optional[Sequence[Any]]) -> list[str]:
    """Names of an onnxruntime ``providers`` argument (names or ``(name, options)`` tuples)."""
    return [p[0] if isinstance(p, (tuple, list)) else str(p) for p in providers or []]


def device_providers(providers: Optional[Sequence[Any]]) -> list[str]:
    """The requested providers that are not the CPU's; ``None`` means onnxruntime's default, all available."""
    names = provider_names(providers) if providers is not None else list(ort.get_available_providers())
    return [n for n in names if n not in HOST_PROVIDERS]


def cpu_tensor(value: Any) -> bool:
    """Whether ``value`` is an ``OrtValue`` tensor in CPU memory (a plan can read it as an array)."""
    return isinstance(value, ort.OrtValue) and value.is_tensor() and value.device_name().lower() == "cpu"


def ort_type(dtype: str) -> str:
    """onnxruntime's type string of a numpy dtype name: ``float32`` -> ``tensor(float)``."""
    try:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return f"tensor({onnx.TensorProto.DataType.Name(elem).lower()})"
    except Exception:  # a name numpy does not know (e.g. bfloat16 without ml_dtypes)
        return f"tensor({dtype})"


def numpy_dtype(type_string: str) -> Optional[np.dtype]:
    """The numpy dtype of an onnxruntime tensor type string (None: not a tensor numpy holds natively)."""
    if not (type_string.startswith("tensor(") and type_string.endswith(")")):
        return None
    name = type_string[len("tensor("):-1].upper()
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, name)))
    except Exception:
        return None
    return dtype if dtype.kind in "biuf" else None


class OriginalModel:
    """One lazily created ``onnxruntime.InferenceSession`` of the model as given, with the user's arguments."""

    def __init__(self, source: Any, sess_options: Optional[ort.SessionOptions] = None,
                 providers: Optional[Sequence[Any]] = None, provider_options: Optional[Sequence[dict]] = None,
                 kwargs: Optional[Mapping[str, Any]] = None):
        if isinstance(sess_options, (str, os.PathLike)):
            raise TypeError("sess_options must be an onnxruntime.SessionOptions (onnxruntime's second positional "
                            "argument); pass fastrun's cache directory as cache_dir=...")
        if isinstance(source, onnx.ModelProto):  # onnxruntime takes bytes or a path; fastrun takes a proto too
            source = source.SerializeToString()
        elif isinstance(source, bytearray):
            source = bytes(source)
        self.source = source
        self.sess_options = sess_options
        self.providers = providers
        self.provider_options = provider_options
        self.kwargs = dict(kwargs or {})
        self.device = device_providers(providers)  # non-CPU providers requested: plans do not apply
        self._session: Optional[ort.InferenceSession] = None
        self._matched: Optional[Any] = None  # ortutil.matched_run of the session
        self._lock = threading.Lock()

    @property
    def created(self) -> bool:
        return self._session is not None

    def thread_cap(self) -> int:
        """The user's ``intra_op_num_threads`` (0: onnxruntime's default, all cores): plans never use more."""
        return max(0, int(self.sess_options.intra_op_num_threads)) if self.sess_options is not None else 0

    def session(self) -> ort.InferenceSession:
        """The onnxruntime session, made on first use exactly as ``onnxruntime.InferenceSession`` would be."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._create()
        return self._session

    def _create(self) -> ort.InferenceSession:
        sess = ort.InferenceSession(self.source, self.sess_options, self.providers, self.provider_options,
                                    **self.kwargs)
        missing = [p for p in self.device if p not in sess.get_providers()]
        if missing:
            message = (f"onnxruntime could not use {', '.join(missing)} (not available in this build or on this "
                       f"machine) and runs the model on {', '.join(sess.get_providers())}")
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            log.warning("%s", message)
        return sess

    def set_providers(self, providers: Optional[Sequence[Any]] = None,
                      provider_options: Optional[Sequence[dict]] = None) -> None:
        """onnxruntime's ``set_providers`` (the session is made again); device providers turn plans off."""
        self.session().set_providers(providers, provider_options)
        self._matched = None  # the session has a new binding
        self.providers, self.provider_options = providers, provider_options
        self.device = device_providers(providers)
        if self.device:
            log.warning("providers %s: fastrun's plans are CPU plans, so none applies; the model runs on "
                        "onnxruntime with these providers", self.device)

    def run(self, output_names: Optional[Sequence[str]], feed: Any, run_options: Any = None) -> list:
        return self.session().run(output_names, feed, run_options)

    def run_matched(self, output_names: list, feed: dict) -> list:
        """:meth:`run` of a feed matched to the model's inputs (:func:`fastrun.system.ortutil.matched_run`)."""
        if self._matched is None:
            self._matched = ortutil.matched_run(self.session())
        return self._matched(output_names, feed)
