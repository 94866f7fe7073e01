"""Training SVF experts: the Trainer (validate, sft step, rl step, checkpoint, resume), objectives (SFT,
REINFORCE), trl's GRPO/RLOO on z."""
