"""Runtime: what every stage's loop runs on: the accelerator (devices, precision, distributed preparation, CPU
threads and memory), optimizer and schedule, checkpoints and resume, fault guards, metric tracking, and the
supervised fit loop SFT, RM and DPO share."""
