"""Runtime: what every stage's loop runs on: the accelerator with its precision, topology and frozen roles
(`accelerator`), which device and process this is (`devices`), CPU allocator settings and model lanes (`cpu`),
seeds, the optimizer and LR schedule (`optim`), checkpoints and resume (`checkpoints`, `run_identity`), what made
an output (`provenance`), fault guards, metric tracking and the trackers of `logging.report_to` (`tracking`), and
the supervised fit loop SFT, RM and DPO share (`fit`)."""
