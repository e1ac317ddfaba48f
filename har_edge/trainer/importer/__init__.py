"""``har-train import``: bring a study's own trained model into har-edge.

sources (model file, labels, scaler, baseline) -> convert (unroll recurrent
layers, fold BatchNorms, full int8) -> windows (the user's exports decoded by
the agent's code) -> figures (measured gate figures) -> golden -> a verified
model folder, an MLflow run and a registered model version (:mod:`.run`).
"""
