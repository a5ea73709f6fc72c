"""The base of every typed settings class: configs (``vialign.config``) and algorithm settings
(``vialign.algorithms``) both build on it, so neither has to import the other."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from vialign.sampling.sampler import sde_window_problem


class StrictModel(BaseModel):
    """Rejects unknown keys and NaN/infinite numbers (no setting means them); validates on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _sde_window(value: tuple[int, int] | None) -> tuple[int, int] | None:
    problem = sde_window_problem(value) if value is not None else None
    if problem:
        raise ValueError(problem)
    return value


# [start, stop) of the stochastic steps of a sampler
SDEWindow = Annotated[tuple[int, int] | None, AfterValidator(_sde_window)]
