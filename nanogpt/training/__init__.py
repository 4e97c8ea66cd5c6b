"""The training layer: the LightningModule (module.py), its optimizer and schedule (optim.py), the callbacks
(checkpointing.py, fault.py, metrics.py, progress.py), loggers, strategies, and the command line (cli.py)."""
