"""opf: a declarative pipeline language for distributed processing of large geodata.

The stages, one folder each, data flowing one way (docs/architecture.md)::

    .opf text --parse--> nodes --check--> findings --lower--> plan (a DiGraph) --run--> engines
      lang/                                                  plan/               run/

:mod:`opals_dsl.api` is the Python API (load, plan, run); ``opf`` is :mod:`opals_dsl.cli`.
This package imports nothing at the top: engines import :mod:`opals_dsl.run.engine` through it.
"""

__version__ = "0.1.0"
