"""Training of the tiny grounding fixture models under ``tests/fixtures/models/`` (see ``scripts/train_fixtures.py``).

One job per module: :mod:`.settings` (what a run is told), :mod:`.supervision` (losses, targets and initial codes
shared by both families), :mod:`.loop` (the optimisation loop and held-out check), :mod:`.paligemma` and
:mod:`.molmo2` (what differs per family), :mod:`.records` (saving a run and its training log), :mod:`.card` (the
model card), :mod:`.presets` (the named stage chains that made the committed fixtures) and :mod:`.runner` (running
them).
"""
