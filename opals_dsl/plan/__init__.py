"""The plan: the contract between the language and the runtime (:mod:`.model`), the engine's
messages (:mod:`.wire`), building and writing the graph (:mod:`.graph`) and drawing it
(:mod:`.dot`).

Kept free of imports: engines import :mod:`.wire` through this package.
"""
