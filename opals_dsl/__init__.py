"""opf: a declarative pipeline language for distributed processing of large geodata.

The stages, one folder each, data flowing one way (docs/architecture.md)::

    .opf text --parse--> nodes --check--> findings --lower--> plan (a DiGraph) --run--> engines
      lang/                                                  plan/               run/

``import opals_dsl as opf`` gives the Python API (:mod:`opals_dsl.api`): ``opf.load``,
``opf.run``, ``opf.draw``, ``opf.PipelineError`` ...; ``opf`` the command is
:mod:`opals_dsl.cli`. This package imports nothing at the top — the API is imported when first
used — because engines import :mod:`opals_dsl.runtime.engine` through it.
"""

from typing import Any

__version__ = "0.1.0"

#: the Python API's names, imported from :mod:`opals_dsl.api` when first asked for
API = ("load", "plan", "draw", "run", "select", "compile_file", "Loaded", "Drawing",
       "OpfError", "PipelineError", "PlanError", "UsageError", "Protected", "RunSummary",
       "ClusterOptions")


def __getattr__(name: str) -> Any:
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'opals_dsl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
