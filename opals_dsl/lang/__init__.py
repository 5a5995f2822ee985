"""The language: ``.opf`` text → syntax tree (:mod:`.parse`, :mod:`.nodes`) → every mistake
(:mod:`.check`) → the plan (:mod:`.lower`). Nothing here imports the runtime."""
