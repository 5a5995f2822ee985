"""opf: a declarative pipeline language for distributed processing of large geodata.

The stages, one module each, data flowing one way::

    .opf text --parse--> nodes --check--> diagnostics --plan--> networkx DiGraph --run--> engines

:func:`opals_dsl.api.compile_file` runs the front end and the planner in one call.
"""

__version__ = "0.1.0"
