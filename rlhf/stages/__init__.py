"""Stages: one module per step of the pipeline (SFT, reward model, DPO, PPO, evaluation) and the pipeline that
chains them through checkpoints. A stage uses the layers below; it never imports another stage."""
