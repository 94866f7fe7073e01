"""Training SVF experts: objectives (SFT, REINFORCE), the training loop with checkpoints, the stage."""
