"""``onnxruntime.IOBinding``'s calls for :class:`fastrun.InferenceSession`.

A binding is recorded, not applied: only at ``run_with_iobinding`` is it known whether the bound
shapes run a plan or the original model. A plan runs when every input is a CPU array or CPU
``OrtValue`` and every output is bound to the CPU without a caller's buffer (``bind_output(name)``
or a CPU ``OrtValue``): the plan runs on the bound arrays and its results become the outputs.
Anything else (device memory, raw pointers) is replayed on onnxruntime's own ``IOBinding`` of the
original model, so it behaves exactly as onnxruntime does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as ort

from fastrun.runtime.original import cpu_tensor

Call = tuple[str, tuple]  # an IOBinding method name and its arguments


class IOBinding:
    """Records ``bind_*`` calls; :meth:`fastrun.InferenceSession.run_with_iobinding` runs them."""

    def __init__(self, session: Any):
        self._session = session
        self._inputs: dict[str, Call] = {}
        self._outputs: dict[str, Call] = {}
        self._replayed: Optional[ort.IOBinding] = None  # onnxruntime's binding of the last run there
        self._results: list[ort.OrtValue] = []          # the last planned run's outputs

    # -- onnxruntime.IOBinding's methods
    def bind_cpu_input(self, name: str, arr_on_cpu: np.ndarray) -> None:
        self._bind(self._inputs, name, "bind_cpu_input", (name, arr_on_cpu))

    def bind_input(self, name: str, device_type: str, device_id: int, element_type: Any, shape: Any,
                   buffer_ptr: int) -> None:
        self._bind(self._inputs, name, "bind_input", (name, device_type, device_id, element_type, shape, buffer_ptr))

    def bind_ortvalue_input(self, name: str, ortvalue: ort.OrtValue) -> None:
        self._bind(self._inputs, name, "bind_ortvalue_input", (name, ortvalue))

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0, element_type: Any = None,
                    shape: Any = None, buffer_ptr: Optional[int] = None) -> None:
        if buffer_ptr is not None and (element_type is None or shape is None):
            raise ValueError("`element_type` and `shape` are to be provided if pre-allocated memory is provided")
        self._bind(self._outputs, name, "bind_output", (name, device_type, device_id, element_type, shape, buffer_ptr))

    def bind_ortvalue_output(self, name: str, ortvalue: ort.OrtValue) -> None:
        self._bind(self._outputs, name, "bind_ortvalue_output", (name, ortvalue))

    def synchronize_inputs(self) -> None:
        if self._replayed is not None:
            self._replayed.synchronize_inputs()

    def synchronize_outputs(self) -> None:
        if self._replayed is not None:
            self._replayed.synchronize_outputs()

    def get_outputs(self) -> list[ort.OrtValue]:
        """The outputs of the last run, as ``OrtValue`` s in the order they were bound."""
        return self._replayed.get_outputs() if self._replayed is not None else list(self._results)

    def copy_outputs_to_cpu(self) -> list:
        if self._replayed is not None:
            return self._replayed.copy_outputs_to_cpu()
        return [v.numpy() for v in self._results]

    def clear_binding_inputs(self) -> None:
        self._inputs.clear()
        self._replayed = None

    def clear_binding_outputs(self) -> None:
        self._outputs.clear()
        self._replayed, self._results = None, []

    # -- what run_with_iobinding needs
    def planned_call(self) -> Optional[tuple[dict[str, np.ndarray], list[str]]]:
        """(input arrays, output names) when a plan can run this binding: everything on the CPU, no raw pointers."""
        if not self._outputs or not all(_cpu_output(call) for call in self._outputs.values()):
            return None
        feed = {}
        for name, (method, args) in self._inputs.items():
            if method == "bind_cpu_input" and isinstance(args[1], np.ndarray):
                feed[name] = args[1]
            elif method == "bind_ortvalue_input" and cpu_tensor(args[1]):
                feed[name] = args[1].numpy()
            else:
                return None
        return feed, list(self._outputs)

    def fill(self, results: list[np.ndarray]) -> None:
        """Make a planned run's results the bound outputs (copied into bound ``OrtValue`` s)."""
        values = []
        for (method, args), array in zip(self._outputs.values(), results):
            if method == "bind_ortvalue_output":
                args[1].update_inplace(np.ascontiguousarray(array))
                values.append(args[1])
            else:
                values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
        self._replayed, self._results = None, values

    def replay(self, session: ort.InferenceSession, run_options: Any, run: Callable) -> None:
        """Bind everything on onnxruntime's own IOBinding of ``session`` and run it there."""
        binding = session.io_binding()
        for method, args in [*self._inputs.values(), *self._outputs.values()]:
            if method == "bind_output" and args[-1] is None:
                args = args[:3]  # no buffer: onnxruntime allocates
            getattr(binding, method)(*args)
        run(binding, run_options)
        self._replayed, self._results = binding, []

    def _bind(self, table: dict[str, Call], name: str, method: str, args: tuple) -> None:
        table[name] = (method, args)
        self._replayed = None


def _cpu_output(call: Call) -> bool:
    method, args = call
    if method == "bind_ortvalue_output":
        return cpu_tensor(args[1])
    return str(args[1]).lower() == "cpu" and args[-1] is None
