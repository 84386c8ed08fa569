"""The recipe format, as pydantic models that forbid unknown keys.

```yaml
name: gmp-90
description: One line that `sparse-lightning recipes list` shows.
variables: {sparsity: 0.9}            # referenced as ${sparsity}; `--var sparsity=0.95` overrides
model: {class_path: sparse_lightning.models.MNIST1DCNN, init_args: {channels: 25}}   # optional default
data: {class_path: sparse_lightning.data.MNIST1DDataModule}                           # optional default
trainer: {max_epochs: 60}             # optional Trainer defaults (an addition to the format: command-line flags win)
reference: {test/acc: 0.957, source: "dense, docs/benchmarks.md"}   # optional: what `fit` compares its result with
stages:
  - name: prune
    start: 0.1                        # the stage window (steps, fraction of training or "3ep"); it becomes the
    end: 0.6                          # `start`/`end` of every method that takes them and does not set its own
    methods:
      - method: gradual_magnitude     # a registered short name
        args: {sparsity: "${sparsity}", every: 40}
```
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

from sparse_lightning.core.schedules import parse_time

TimeField = StrictInt | StrictFloat | StrictStr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassSpec(_Strict):
    class_path: StrictStr
    init_args: dict[str, Any] = Field(default_factory=dict)


class MethodSpec(_Strict):
    method: StrictStr
    args: dict[str, Any] = Field(default_factory=dict)


class Stage(_Strict):
    name: StrictStr | None = None
    start: TimeField | None = None
    end: TimeField | None = None
    methods: list[MethodSpec] = Field(min_length=1)

    @field_validator("start", "end")
    @classmethod
    def _time(cls, value: int | float | str | None, info: Any) -> int | float | str | None:
        if value is not None:
            parse_time(value, info.field_name)
        return value


class Recipe(_Strict):
    name: StrictStr = Field(min_length=1)
    description: StrictStr
    variables: dict[str, Any] = Field(default_factory=dict)
    model: ClassSpec | None = None
    data: ClassSpec | None = None
    trainer: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] = Field(default_factory=dict)
    stages: list[Stage] = Field(min_length=1)
