"""Running a plan: the engine side (:mod:`.engine`), the scheduler, the cluster, the journal
that makes a run resumable, progress and the trace.

Kept free of imports: engines import :mod:`.engine` through this package.
"""
