"""Which whole-model engines the end-to-end race may use: ``FASTRUN_ENGINES`` or ``--engines``.

Every engine other than onnxruntime costs a race its first compile in a fresh process (OpenVINO:
1.6-5 s per model and shape set), so a user who knows the answer can leave it out. onnxruntime is
in every race whatever the list says: it is the baseline every stored plan must beat. fastrun's own
assignments are not engines and race too.

A plan records the engines it raced (``Plan.engines``: the allowed ones usable here). Plans are
found as before, whatever engines made them; ``fastrun warmup`` makes a plan again (its timings
reused) when an engine allowed and usable now was not in its race, or when the engine that won it
is no longer allowed.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from fastrun.errors import InputError
from fastrun.runtime.plan import ENGINE_FASTRUN, ENGINE_ORIGINAL, Plan
from fastrun.workflows.candidates import ONNXRUNTIME
from fastrun.workflows.engine_candidates import ENGINES

ENV_ENGINES = "FASTRUN_ENGINES"


def known() -> tuple[str, ...]:
    """Every engine name the switch takes: onnxruntime first, then the optional engines."""
    return (ONNXRUNTIME, *ENGINES)


def allowed(names: Union[str, Sequence[str], None] = None) -> tuple[str, ...]:
    """The engines a race may use: ``names`` (a comma list or a sequence), else ``$FASTRUN_ENGINES``,
    else every known engine; onnxruntime always. An unknown name is the user's error."""
    if names is None:
        names = os.environ.get(ENV_ENGINES, "")
    if isinstance(names, str):
        names = names.split(",")
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(known()))
    if unknown:
        raise InputError(f"unknown engine {', '.join(map(repr, unknown))}: choose from {', '.join(known())}")
    return tuple(n for n in known() if n == ONNXRUNTIME or n in wanted or not wanted)


def usable(name: str) -> bool:
    """Whether this process can run engine ``name`` (an optional engine's package imports)."""
    return name == ONNXRUNTIME or ENGINES[name]().available()


def raced(engines: Sequence[str]) -> list[str]:
    """What a race allowed ``engines`` really runs here: the usable ones."""
    return [n for n in engines if usable(n)]


def engine_of(plan: Plan) -> str:
    """The engine that runs ``plan``: an optional engine's name, else onnxruntime (fastrun's own
    programs are onnxruntime sessions and host kernels: they need no optional engine)."""
    return ONNXRUNTIME if plan.engine in (ENGINE_FASTRUN, ENGINE_ORIGINAL) else plan.engine


def race_again_reason(plan: Plan, engines: Sequence[str]) -> Optional[str]:
    """Why ``plan`` must be raced again under ``engines`` (None: its race stands). A verified plan
    that records no engines was raced by every engine installed when it was made."""
    if engine_of(plan) not in engines:
        return f"it runs on {plan.engine}, which is not allowed now"
    missing = [n for n in engines if plan.engines and n not in plan.engines and usable(n)]
    return f"{', '.join(missing)} did not race it" if missing else None
